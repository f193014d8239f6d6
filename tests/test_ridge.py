"""The analytic ridge head (RanPAC-style): exact, order-invariant, sample-free."""

from __future__ import annotations

import pytest
import torch

from promptcil.backbone import load_backbone
from promptcil.config import BackboneConfig
from promptcil.features import backbone_statistics
from promptcil.heads.ridge import RIDGE_CANDIDATES, RidgeHead

from conftest import TINY_BACKBONE, DigitsTasks, Interrupted, build_model, interrupt_after, make_params, train_run


@pytest.fixture(scope="module")
def features(digits_tasks: DigitsTasks) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed features (frozen random tiny ViT, no prompt) of the digits training set, incremental labels."""
    backbone = load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)
    stats = backbone_statistics(backbone, digits_tasks.train, 256, torch.device("cpu"))
    return stats["cls"], stats["labels"]


def fit(head: RidgeHead, features, labels, tasks: list[list[int]]) -> RidgeHead:
    """Feed tasks in order; labels must already be numbered in arrival order."""
    for classes in tasks:
        head.add_classes(len(classes))
        mask = torch.isin(labels, torch.tensor(classes))
        for chunk in torch.split(torch.nonzero(mask).flatten(), 100):  # several batches per task
            head.observe(features[chunk], labels[chunk])
        head.end_task()
    return head


def test_task_by_task_equals_all_at_once(features, digits_tasks):
    feats, labels = features
    split = digits_tasks.split
    tasks = [list(split.task_classes(t)) for t in range(split.num_tasks)]
    incremental = fit(RidgeHead(feats.shape[1], 256, ridge=1.0), feats, labels, tasks)
    joint = fit(RidgeHead(feats.shape[1], 256, ridge=1.0), feats, labels, [list(range(10))])
    torch.testing.assert_close(incremental.gram, joint.gram, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(incremental.targets, joint.targets, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(incremental.weight, joint.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(incremental(feats), joint(feats), rtol=1e-4, atol=1e-5)


def test_the_same_head_for_two_task_orders(features, digits_tasks):
    feats, labels = features
    split = digits_tasks.split
    tasks = [list(split.task_classes(t)) for t in range(split.num_tasks)]
    forward = fit(RidgeHead(feats.shape[1], 256, ridge=1.0), feats, labels, tasks)
    # reversed arrival: classes are numbered in the order they arrive, so relabel, then compare per class
    arrival = [c for task in reversed(tasks) for c in task]
    relabel = torch.empty(10, dtype=torch.int64)
    relabel[torch.tensor(arrival)] = torch.arange(10)
    backward = fit(RidgeHead(feats.shape[1], 256, ridge=1.0), feats, relabel[labels],
                   [[int(relabel[c]) for c in task] for task in reversed(tasks)])
    torch.testing.assert_close(backward.weight[:, relabel], forward.weight, rtol=1e-4, atol=1e-6)


def test_its_state_holds_no_sample(features, digits_tasks):
    feats, labels = features
    tasks = [list(digits_tasks.split.task_classes(t)) for t in range(digits_tasks.split.num_tasks)]
    once = fit(RidgeHead(feats.shape[1], 128, ridge=1.0), feats, labels, tasks).state_dict()
    twice = fit(RidgeHead(feats.shape[1], 128, ridge=1.0), feats.repeat(2, 1), labels.repeat(2), tasks).state_dict()
    assert set(once) == {"gram", "targets", "count", "weight", "ridge"}  # the projection is regenerated from its seed
    assert {k: v.shape for k, v in once.items()} == {k: v.shape for k, v in twice.items()}
    assert once["gram"].shape == (128, 128) and once["targets"].shape == (128, 10)


def test_ridge_is_chosen_by_gcv_from_the_sums_and_equals_the_all_at_once_choice(features, digits_tasks):
    """GCV needs only the sums, so the strength chosen after the last task, and the head, are those of a
    head fitted on all tasks at once; a task only adds to the sums, so its choice may change per task."""
    feats, labels = features
    tasks = [list(digits_tasks.split.task_classes(t)) for t in range(digits_tasks.split.num_tasks)]
    incremental = fit(RidgeHead(feats.shape[1], 128), feats, labels, tasks)
    joint = fit(RidgeHead(feats.shape[1], 128), feats, labels, [list(range(10))])
    assert float(incremental.ridge) in RIDGE_CANDIDATES
    assert float(incremental.ridge) == float(joint.ridge)
    # float64 sums, summed in another order
    torch.testing.assert_close(incremental.weight, joint.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(incremental(feats), joint(feats), rtol=1e-3, atol=1e-3)


def test_gcv_picks_the_strength_with_the_least_gcv_score(features, digits_tasks):
    """The choice against a brute-force GCV over the candidates, computed from the samples themselves
    (hat matrix and residuals in sample space), on a problem with fewer samples than features."""
    feats, labels = features
    head = RidgeHead(feats.shape[1], 256)
    keep = torch.arange(len(labels))[:200]
    head.add_classes(10)
    head.observe(feats[keep], labels[keep])
    head.end_task()
    phi = head.expand(feats[keep]).double()
    target = torch.nn.functional.one_hot(labels[keep], 10).double()
    n = len(keep)

    def score(ridge: float) -> float:
        kernel = phi @ phi.T  # the hat matrix in sample space: K (K + l I)^-1
        hat = kernel @ torch.linalg.inv(kernel + ridge * torch.eye(n, dtype=torch.float64))
        rss = ((target - hat @ target) ** 2).sum()
        return float(n * rss / (n - hat.trace()) ** 2)

    candidates = [r for r in RIDGE_CANDIDATES if r >= 1e-2]  # below that, sample space is ill-conditioned
    best = min(candidates, key=score)
    assert float(head.ridge) == best


def test_a_restored_head_continues_exactly(features, digits_tasks):
    """What the retrain flow does: load the saved sums, add only the new task."""
    feats, labels = features
    tasks = [list(digits_tasks.split.task_classes(t)) for t in range(digits_tasks.split.num_tasks)]
    straight = fit(RidgeHead(feats.shape[1], 128, ridge=1.0), feats, labels, tasks)
    saved = fit(RidgeHead(feats.shape[1], 128, ridge=1.0), feats, labels, tasks[:-1]).state_dict()
    restored = RidgeHead(feats.shape[1], 128, ridge=1.0)
    restored.load_grown_state(saved)
    fit(restored, feats, labels, tasks[-1:])
    torch.testing.assert_close(restored.weight, straight.weight)


def test_apt_with_ridge_adapts_on_the_first_task_then_the_head_is_exact(digits_tasks, tmp_path):
    """RanPAC's first-session adaptation: APT trains on task 0 through a temporary linear head, then
    stays fixed; the ridge head over all tasks equals one fitted once on the final model's features."""
    from promptcil.training import load_task_state, task_state_path

    backbone = load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)
    params = make_params(method={"name": "apt"}, head={"name": "ridge", "ridge": {"projection_dim": 128, "ridge": 1.0}})
    model = train_run(params, backbone, digits_tasks, tmp_path)
    prompts = []
    for t in range(digits_tasks.split.num_tasks):
        load_task_state(model, task_state_path(tmp_path, t))
        prompts.append(model.method.additive_cls_prompt.detach().clone())
    initial = build_model(params, backbone).method.additive_cls_prompt.detach()
    assert not torch.allclose(prompts[0], initial)  # the prompt trained on the first task
    model.method.attach()  # building `initial` claimed the shared backbone
    assert all(torch.equal(prompts[0], p) for p in prompts[1:])  # frozen after the first task
    model.eval()
    with torch.no_grad():
        feats = model.features(digits_tasks.train.images)
    joint = fit(RidgeHead(feats.shape[1], 128, ridge=1.0), feats, digits_tasks.train.labels, [list(range(10))])
    torch.testing.assert_close(model.head.weight, joint.weight, rtol=1e-4, atol=1e-5)


def test_first_session_adaptation_resumes_bit_identically(digits_tasks, tmp_path):
    backbone = load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)
    params = make_params(method={"name": "apt"}, head={"name": "ridge", "ridge": {"projection_dim": 64, "ridge": 1.0}},
                         train={"epochs": 2})
    reference = train_run(params, backbone, digits_tasks, tmp_path / "straight").trainable_state()

    with pytest.raises(Interrupted):
        train_run(params, backbone, digits_tasks, tmp_path / "resumed", on_epoch_end=interrupt_after(0, 0))
    resumed = train_run(params, backbone, digits_tasks, tmp_path / "resumed").trainable_state()
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
