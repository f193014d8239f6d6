"""CIL metrics against numbers worked out by hand, plus FLOP and parameter counts."""

from __future__ import annotations

import pytest
import torch

from promptcil.evaluation import accuracy, count_parameters, gflops_per_image, summarize


def test_accuracy_of_labels() -> None:
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="argmax"):
        accuracy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.zeros(0), torch.zeros(0))


def test_summarize_weights_tasks_by_test_samples() -> None:
    matrix = [
        [0.9, None, None],
        [0.8, 0.7, None],
        [0.6, 0.5, 0.9],
    ]
    counts = [100, 50, 50]
    result = summarize(matrix, counts)
    # after task 0: 0.9
    # after task 1: (100*0.8 + 50*0.7) / 150 = 115/150
    # after task 2: (100*0.6 + 50*0.5 + 50*0.9) / 200 = 130/200 = 0.65
    # (unweighted means would give 0.75 and 0.6667 instead)
    assert result["accuracy_after_task"] == pytest.approx([0.9, 115 / 150, 0.65])
    assert result["A_last"] == pytest.approx(0.65)
    # A_avg = (0.9 + 115/150 + 0.65) / 3 = 69.5 / 90
    assert result["A_avg"] == pytest.approx(69.5 / 90)
    # forgetting: task 0: max(0.9, 0.8) - 0.6 = 0.3; task 1: 0.7 - 0.5 = 0.2; mean 0.25
    assert result["forgetting"] == pytest.approx(0.25)
    assert result["accuracy_matrix"] == matrix
    assert result["accuracy_matrix"] is not matrix


def test_forgetting_uses_best_accuracy_before_last_task_and_is_not_clamped() -> None:
    matrix = [
        [0.5, None, None, None],
        [0.7, 0.8, None, None],
        [0.65, 0.6, 0.9, None],
        [0.6, 0.5, 0.95, 0.4],
    ]
    result = summarize(matrix, [10, 20, 30, 40])
    # task 0: max(0.5, 0.7, 0.65) - 0.6 = 0.1; task 1: max(0.8, 0.6) - 0.5 = 0.3;
    # task 2: 0.9 - 0.95 = -0.05 (improved); mean = 0.35 / 3
    assert result["forgetting"] == pytest.approx(0.35 / 3)
    # after the last task: (10*0.6 + 20*0.5 + 30*0.95 + 40*0.4) / 100 = (6 + 10 + 28.5 + 16) / 100
    assert result["A_last"] == pytest.approx(0.605)
    assert result["newest_task_accuracy_after_task"] == [0.5, 0.8, 0.9, 0.4]  # the diagonal


def test_single_task_has_no_forgetting() -> None:
    result = summarize([[0.83]], [12])
    assert result == {
        "accuracy_matrix": [[0.83]],
        "accuracy_after_task": [0.83],
        "newest_task_accuracy_after_task": [0.83],
        "A_last": 0.83,
        "A_avg": 0.83,
        "forgetting": None,
    }


@pytest.mark.parametrize(
    ("matrix", "counts", "message"),
    [
        ([], [], "empty"),
        ([[0.9, None], [0.8, 0.7]], [10], "test_counts has 1 entries but acc_matrix has 2 tasks"),
        ([[0.9, 0.5], [0.8, 0.7]], [10, 10], r"acc_matrix\[0\]\[1\] = 0.5 .* lower-triangular"),
        ([[0.9, None], [None, 0.7]], [10, 10], r"acc_matrix\[1\]\[0\] = None"),
        ([[0.9], [0.8, 0.7]], [10, 10], "row 0 has 1 entries; expected 2"),
        ([[90.0, None], [80.0, 70.0]], [10, 10], r"expected an accuracy in \[0, 1\]"),
        ([[0.9, None], [0.8, 0.7]], [10, 0], r"test_counts\[1\] = 0"),
    ],
)
def test_summarize_rejects_malformed_input(
    matrix: list[list[float | None]], counts: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        summarize(matrix, counts)


def test_gflops_of_a_linear_layer_per_image() -> None:
    layer = torch.nn.Linear(10, 20)
    assert gflops_per_image(layer, torch.randn(4, 10)) == pytest.approx(2 * 10 * 20 / 1e9)
    with pytest.raises(ValueError, match="non-empty batch"):
        gflops_per_image(layer, torch.randn(0, 10))


def test_count_parameters_skips_frozen_ones() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 20 * 3 + 3
    assert count_parameters(model, trainable_only=False) == 10 * 20 + 20 + 20 * 3 + 3
