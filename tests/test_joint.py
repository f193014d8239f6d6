"""The joint upper bound: a fresh head of the run's kind fitted on all classes at once, on the final
model's features. Exact heads reach it; the masked linear head falls far below it."""

from __future__ import annotations

import pytest
import torch

from promptcil.evaluation import joint_upper_bound

from conftest import DigitsTasks, make_params, train_run
from test_train import evaluate

CPU = torch.device("cpu")


@pytest.mark.parametrize("method, head, exact", [
    ("none", "prototype", True), ("none", "ridge", True), ("apt", "ridge", True), ("apt", "linear", False)])
def test_joint_bound_equals_exact_heads_and_tops_the_masked_linear_head(
        method, head, exact, pretrained_backbone, digits_tasks: DigitsTasks, tmp_path):
    params = make_params(method={"name": method}, train={"epochs": 3},
                         head={"name": head, "ridge": {"projection_dim": 512}, "align": {"enabled": False}})
    model = train_run(params, pretrained_backbone, digits_tasks, tmp_path)
    a_last = evaluate(model, digits_tasks, tmp_path)["A_last"]  # leaves the last task's state loaded
    joint = joint_upper_bound(model, params.head, params.train, digits_tasks.train, digits_tasks.test, 256, CPU)
    if exact:  # the head after T tasks is the head fitted on all T at once, on the same features
        assert joint == pytest.approx(a_last, abs=1 / len(digits_tasks.test))
    else:
        assert joint > a_last + 0.15, (joint, a_last)
