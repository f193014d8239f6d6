"""The incremental trainer on real digits with real timm ViTs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptcil.backbone import load_backbone
from promptcil.config import BackboneConfig
from promptcil.data import ImageSet
from promptcil.evaluation import accuracy_matrix, summarize
from promptcil.model import IncrementalModel
from promptcil.training import IncrementalTrainer, task_state_path

from conftest import TINY_BACKBONE, DigitsTasks, Interrupted, interrupt_after, make_params
from conftest import build_model as build
from conftest import train_run as run


def evaluate(model: IncrementalModel, tasks: DigitsTasks, out: Path) -> dict:
    states = [task_state_path(out, t) for t in range(tasks.split.num_tasks)]
    matrix, counts = accuracy_matrix(model, states, tasks.test, tasks.split, 256, torch.device("cpu"))
    return summarize(matrix, counts)


@pytest.fixture(scope="module")
def random_backbone():
    return load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)


@pytest.mark.parametrize("method", ["apt", "vpt", "l2p"])
def test_backbone_is_bit_identical_and_only_prompt_and_head_train(method, random_backbone, digits_tasks, tmp_path):
    before = {k: v.clone() for k, v in random_backbone.state_dict().items()}
    params = make_params(method={"name": method}, train={"epochs": 1})
    model = run(params, random_backbone, digits_tasks, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in random_backbone.state_dict().items())
    assert not any(p.requires_grad for p in random_backbone.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in list(model.method.parameters()) + list(model.head.parameters())}
    assert model.head.num_classes == 10


def test_a_task_trains_on_its_own_data_only(random_backbone, digits_tasks, tmp_path):
    """Rehearsal-free: wrecking every other task's images leaves a task's trained state unchanged."""
    params = make_params(method={"name": "apt"}, train={"epochs": 1})
    split = digits_tasks.split
    task1 = torch.isin(digits_tasks.train.labels, torch.tensor(list(split.task_classes(1))))
    trainer = IncrementalTrainer(build(params, random_backbone), split, params.train, tmp_path / "probe",
                                 progress=False)
    for t in range(split.num_tasks):
        loader = trainer.task_loader(trainer.task_data(digits_tasks.train, t), t, epoch=0)
        assert set(torch.cat([labels for _, labels in loader]).tolist()) == set(split.task_classes(t))
    wrecked = ImageSet(
        images=torch.where(task1[:, None, None, None], digits_tasks.train.images,
                           torch.full_like(digits_tasks.train.images, 255)),
        labels=digits_tasks.train.labels,
        class_names=digits_tasks.train.class_names,
    )
    # Train tasks 0 and 1 on clean data, then task 1 again from the same state on wrecked data.
    clean_model = build(params, random_backbone)
    IncrementalTrainer(clean_model, split, params.train, tmp_path / "clean", progress=False).run(digits_tasks.train,
                                                                                                 tasks=[0, 1])
    wrecked_model = build(params, random_backbone)
    trainer = IncrementalTrainer(wrecked_model, split, params.train, tmp_path / "wrecked", progress=False)
    trainer.run(digits_tasks.train, tasks=[0])
    trainer.run(wrecked, tasks=[1], resume=False)
    clean, dirty = clean_model.trainable_state(), wrecked_model.trainable_state()
    assert clean.keys() == dirty.keys()
    assert all(torch.equal(clean[k], dirty[k]) for k in clean)


def test_resume_after_an_interrupted_epoch_ends_identical(random_backbone, digits_tasks, tmp_path):
    params = make_params(method={"name": "apt"}, train={"epochs": 2})
    reference = run(params, random_backbone, digits_tasks, tmp_path / "straight").trainable_state()

    with pytest.raises(Interrupted):
        run(params, random_backbone, digits_tasks, tmp_path / "resumed", on_epoch_end=interrupt_after(2, 0))
    assert not task_state_path(tmp_path / "resumed", 2).exists()
    resumed = run(params, random_backbone, digits_tasks, tmp_path / "resumed").trainable_state()
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


@pytest.mark.slow
@pytest.mark.parametrize(
    # measured on digits B4+3x2 with the base-class backbone (2-core CPU, seed 0): SimpleCIL 0.55-0.56,
    # APT + linear 0.42 unaligned, 0.64 aligned; VPT-deep (2 tokens) 0.39 unaligned, 0.27 aligned (its prompt
    # trains freely on every task, so earlier classes' statistics go stale: docs/methods.md); ridge head (GCV)
    # on frozen features 0.86; chance is 0.10. With 10 tokens per block VPT-deep drowns this 16-patch, 48-wide
    # ViT and forgets (0.16-0.33), so the test uses 2.
    "method, head, align, lr, threshold",
    [("none", "prototype", True, 1e-2, 0.45), ("apt", "linear", True, 1e-2, 0.55),
     ("vpt", "linear", False, 1e-3, 0.28), ("none", "ridge", True, 1e-2, 0.80)],
)
def test_digits_run_beats_chance_by_far(
    method, head, align, lr, threshold, pretrained_backbone, digits_tasks, tmp_path
):
    params = make_params(method={"name": method, "vpt": {"length": 2}},
                         head={"name": head, "align": {"enabled": align}}, train={"epochs": 5, "lr": lr})
    model = run(params, pretrained_backbone, digits_tasks, tmp_path)
    summary = evaluate(model, digits_tasks, tmp_path)
    assert summary["accuracy_matrix"][0][0] > 0.9  # the pretrained backbone knows its base classes
    assert summary["A_last"] > threshold, summary


def test_compile_auto_compiles_only_long_cuda_runs_and_keeps_its_cache(tmp_path, monkeypatch) -> None:
    import os

    from promptcil.compiling import AUTO_MIN_STEPS, compile_cache, should_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not should_compile("auto", cpu, 10 * AUTO_MIN_STEPS)  # never on a CPU by itself
    assert not should_compile("auto", cuda, AUTO_MIN_STEPS - 1)
    assert should_compile("auto", cuda, AUTO_MIN_STEPS)
    assert should_compile(True, cpu, 1) and not should_compile(False, cuda, 10 * AUTO_MIN_STEPS)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache() == tmp_path / "promptcil" / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "promptcil" / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "own"))
    assert compile_cache() == tmp_path / "own" and (tmp_path / "own").is_dir()  # the user's choice wins


def test_a_compiled_pretraining_builds_one_graph_whatever_the_batch_size_and_shift(digits_tasks, tmp_path, monkeypatch):
    """backbone.pretrain.compile: the random shift is a different crop of the padded batch every step and an
    epoch ends on a smaller batch; neither compiles the forward again (a crop's storage offset did, on the device:
    docs/scaling.md). The compiled pretraining learns as the eager one does."""
    from torch._dynamo.utils import counters

    from promptcil.data import subset
    from promptcil.pretrain import pretrain_backbone

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    base = subset(digits_tasks.train, list(digits_tasks.split.task_classes(0)))
    assert len(base) % 64  # an epoch ends on a smaller batch
    pretrained = {}
    for setting in (False, True):
        torch._dynamo.reset()
        counters.clear()
        params = make_params(backbone={"source": "pretrain", "pretrain": {"epochs": 4, "batch_size": 64,
                                                                          "compile": setting}})
        pretrained[setting] = pretrain_backbone(params.backbone, base, torch.device("cpu"), progress=False)
    assert pretrained[True].compiled and not pretrained[False].compiled
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert pretrained[True].epoch_losses[-1] < 0.95 * pretrained[True].epoch_losses[0]  # it learns
    assert pretrained[True].epoch_losses == pytest.approx(pretrained[False].epoch_losses, rel=0.02)
    torch._dynamo.reset()


def test_a_compiled_run_builds_two_graphs_matches_eager_and_a_second_run_takes_them_from_the_cache(
        random_backbone, digits_tasks, tmp_path, monkeypatch):
    """train.compile: the batch dimension is marked dynamic, so a task's last, smaller batch (and every evaluation
    batch size) reuses the graph instead of compiling another (3 graphs before; the time it saves:
    docs/performance.md). The compiled run ends where the eager one does."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    params = make_params(method={"name": "apt"}, train={"epochs": 1, "batch_size": 64})
    per_task = [int(torch.isin(digits_tasks.train.labels, torch.tensor(list(digits_tasks.split.task_classes(t))))
                    .sum()) for t in range(digits_tasks.split.num_tasks)]
    assert any(n % 64 for n in per_task)  # a task ends on a smaller batch
    eager = evaluate(run(params, random_backbone, digits_tasks, tmp_path / "eager"), digits_tasks, tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled_params = make_params(method={"name": "apt"}, train={"epochs": 1, "batch_size": 64, "compile": True})
    model = run(compiled_params, random_backbone, digits_tasks, tmp_path / "compiled")
    compiled = evaluate(model, digits_tasks, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert compiled["A_last"] == pytest.approx(eager["A_last"], abs=0.02)
    torch._dynamo.reset()
    counters.clear()  # a second run (Dynamo's in-memory state gone) takes both graphs from the caches on disk
    again = evaluate(run(compiled_params, random_backbone, digits_tasks, tmp_path / "again"), digits_tasks,
                     tmp_path / "again")
    assert dict(counters["aot_autograd"]) == {"total": 2, "autograd_cache_hit": 2, "ok": 2}, dict(counters)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and not counters["inductor"]["fxgraph_cache_miss"]
    assert again["A_last"] == compiled["A_last"]
    torch._dynamo.reset()
