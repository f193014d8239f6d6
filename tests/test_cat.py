"""DePT's CAT head and the base/new measurement: against the prototype head, against hand-computed
numbers, and through the real trainer on digits."""

from __future__ import annotations

import pytest
import torch

from promptcil.artifacts import load_tensors
from promptcil.config import ConfigError, TrainConfig, parse_params
from promptcil.data import ImageSet
from promptcil.evaluation import (
    accuracy_matrix,
    base_new,
    base_new_summary,
    features_of,
    harmonic_mean,
    nearest_prototype_accuracy,
    summarize,
)
from promptcil.heads.cat import CatHead
from promptcil.heads.prototype import PrototypeHead
from promptcil.training import IncrementalTrainer, epoch_lr, load_task_state, task_state_path

from conftest import Interrupted, build_model, interrupt_after, make_params, train_run

CPU = torch.device("cpu")


def every_fourth(data: ImageSet) -> ImageSet:
    """A quarter of the training images (every class keeps ~30): enough for tests of mechanics."""
    return ImageSet(data.images[::4], data.labels[::4], data.class_names)


def observe_task(head, features: torch.Tensor, labels: torch.Tensor, count: int) -> None:
    head.add_classes(count)
    head.observe(features, labels)
    head.end_task()


def test_identity_cat_with_fusion_weight_zero_predicts_like_the_prototype_head() -> None:
    torch.manual_seed(0)
    cat, prototype = CatHead(16, fusion_weight=0.0, logit_scale=100.0), PrototypeHead(16)
    features = torch.randn(60, 16)
    for first, labels in ((0, torch.arange(60) % 4), (4, 4 + torch.arange(60) % 2)):  # two tasks: 4 + 2 classes
        for head in (cat, prototype):
            observe_task(head, features + labels[:, None], labels, int(labels.max()) + 1 - first)
    test = torch.randn(200, 16) * 3
    assert torch.equal(cat.image_transform(test), test)  # identity at init
    torch.testing.assert_close(cat(test), 100.0 * prototype(test))
    assert torch.equal(cat(test).argmax(1), prototype(test).argmax(1))
    torch.testing.assert_close(cat.class_means, prototype.class_means)


def test_fusion_mixes_the_trained_logits_with_weight_lambda() -> None:
    torch.manual_seed(0)
    head = CatHead(8, fusion_weight=0.7, logit_scale=10.0)
    observe_task(head, torch.randn(12, 8), torch.arange(12) % 3, 3)
    x = torch.randn(5, 8)
    expected = 0.7 * (x @ head.weight.T + head.bias) + 0.3 * head.matching_logits(x)
    torch.testing.assert_close(head(x), expected)


def test_cat_parameters_get_gradients_the_backbone_none_and_earlier_rows_none(random_backbone, digits_tasks) -> None:
    params = make_params(method={"name": "vpt", "vpt": {"length": 2}}, head={"name": "cat"})
    model = build_model(params, random_backbone)
    images, labels = digits_tasks.train.images, digits_tasks.train.labels
    with torch.no_grad():
        for first, count in ((0, 4), (4, 2)):
            task = (labels >= first) & (labels < first + count)
            observe_task(model.head, model.features(images[task]), labels[task], count)
    batch = (labels >= 4) & (labels < 6)
    model.train()
    model.head.loss(model.features(images[batch][:32]), labels[batch][:32], first_class=4).backward()
    head = model.head
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert torch.all(head.weight.grad[:4] == 0) and torch.all(head.bias.grad[:4] == 0)  # task 0's rows: masked
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.method.parameters())
    assert all(p.grad is None and not p.requires_grad for p in random_backbone.parameters())


def test_nearest_prototype_accuracy_and_base_new_hm_by_hand() -> None:
    # class 4's mean is (1, 0.1), class 5's (0.1, 1)
    train = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]])
    train_labels = torch.tensor([4, 4, 5, 5])
    # cosines to (1, 0.1) and (0.1, 1): (1, 0.5) -> 0.934 vs 0.534: class 4, right; (0.4, 1) -> 0.462 vs
    # 0.961: class 5, right; (1, 0.9) -> 0.806 vs 0.740: class 4, but it is a 5: wrong
    test = torch.tensor([[1.0, 0.5], [0.4, 1.0], [1.0, 0.9]])
    test_labels = torch.tensor([4, 5, 5])
    assert nearest_prototype_accuracy(train, train_labels, test, test_labels) == pytest.approx(2 / 3)
    # an ensemble: member 2 (same means) sees (0.9, 1) -> 0.740 vs 0.806: wrong; (0.4, 1): right; (0, 1) ->
    # 0.100 vs 0.995: right. Alone 2/3 each; the mean cosines, (0.837, 0.670), (.., ..), (0.453, 0.868), are all right
    other = torch.tensor([[0.9, 1.0], [0.4, 1.0], [0.0, 1.0]])
    assert nearest_prototype_accuracy(train, train_labels, other, test_labels) == pytest.approx(2 / 3)
    members = torch.stack([train, train]), torch.stack([test, other])
    assert nearest_prototype_accuracy(members[0], train_labels, members[1], test_labels) == 1.0
    # only the classes of the train features compete: a test image of another class counts as wrong
    assert nearest_prototype_accuracy(train, train_labels, test[:1], torch.tensor([7])) == 0.0

    summary = base_new_summary([0.9, 0.8, 0.7], [2 / 3, 0.5, None])
    hm0, hm1 = 2 * 0.9 * (2 / 3) / (0.9 + 2 / 3), 2 * 0.8 * 0.5 / 1.3  # 0.7660, 0.6154
    assert summary["HM_after_task"] == pytest.approx([hm0, hm1, None])
    assert summary["base_avg"] == pytest.approx(0.85)  # over the tasks with a new accuracy: not the last
    assert summary["next_task_class_mean_avg"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert summary["HM_avg"] == pytest.approx((hm0 + hm1) / 2)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert base_new_summary([0.5], [None])["HM_avg"] is None  # one task: nothing comes next


@pytest.mark.parametrize(
    "cat, key",
    [
        ({"loss_weight": 1.5}, "head.cat.loss_weight"),
        ({"fusion_weight": -0.1}, "head.cat.fusion_weight"),
        ({"logit_scale": 0}, "head.cat.logit_scale"),
        ({"lr_scale": -1}, "head.cat.lr_scale"),
        ({"lambda": 0.7}, "head.cat.lambda"),
    ],
)
def test_bad_cat_params_fail_with_one_line_naming_the_key(cat, key) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"head": {"name": "cat", "cat": cat}})
    assert "\n" not in str(info.value) and f"{key}:" in str(info.value), info.value


def test_cat_run_on_digits_trains_every_task_and_stores_the_final_prototypes(random_backbone, digits_tasks, tmp_path):
    params = make_params(method={"name": "apt"}, head={"name": "cat"}, train={"epochs": 1})
    before = {k: v.clone() for k, v in random_backbone.state_dict().items()}
    model = train_run(params, random_backbone, digits_tasks, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in random_backbone.state_dict().items())
    assert model.head.num_classes == 10 and model.head.class_means.shape == (10, 48)
    assert not torch.equal(model.head.image_transform.scale, torch.ones(48))  # the CAT transform trained
    # the stored prototypes of the last task are its class means through the final (merged) prompt
    last = digits_tasks.split.task_classes(3)
    data = [digits_tasks.train.labels == c for c in last]
    features = features_of(model, digits_tasks.train, 256, CPU)[0]
    torch.testing.assert_close(model.head.class_means[list(last)], torch.stack([features[m].mean(0) for m in data]))

    states = [task_state_path(tmp_path, t) for t in range(4)]
    matrix, counts = accuracy_matrix(model, states, digits_tasks.test, digits_tasks.split, 256, CPU)
    after = summarize(matrix, counts)["accuracy_after_task"]
    result = base_new(model, states, after, digits_tasks.train, digits_tasks.test, digits_tasks.split, 256, CPU)
    assert result["base_after_task"] == after
    assert result["next_task_class_mean_after_task"][-1] is None and result["HM_after_task"][-1] is None
    assert all(0.0 <= n <= 1.0 for n in result["next_task_class_mean_after_task"][:-1])


def test_cat_learning_rate_is_its_own_param_group(random_backbone, digits_tasks, tmp_path):
    params = make_params(method={"name": "vpt", "vpt": {"length": 2}}, head={"name": "cat", "cat": {"lr_scale": 4.0}},
                         train={"epochs": 2, "lr": 0.01})
    with pytest.raises(Interrupted):
        train_run(params, random_backbone, digits_tasks, tmp_path, on_epoch_end=interrupt_after(0, 0))
    checkpoint = next((tmp_path / "checkpoints").glob("ckpt-*.safetensors"))
    groups = load_tensors(checkpoint, kind="checkpoint")[1]["metadata"]["optimizer"]["param_groups"]
    lr = epoch_lr(TrainConfig(epochs=2, lr=0.01), 0)
    assert [(g["lr"], g.get("lr_scale")) for g in groups] == [(lr, None), (pytest.approx(4 * lr), 4.0)]


def test_cat_resume_mid_task_ends_identical(random_backbone, digits_tasks, tmp_path):
    """The start-of-task prototypes travel in the checkpoint, so a resumed task trains on the same anchors."""
    params = make_params(method={"name": "apt"}, head={"name": "cat"}, train={"epochs": 2})

    def run(out, **options) -> dict[str, torch.Tensor]:
        model = build_model(params, random_backbone)
        trainer = IncrementalTrainer(model, digits_tasks.split, params.train, out, progress=False, **options)
        trainer.run(every_fourth(digits_tasks.train), tasks=[0, 1])
        return model.trainable_state()

    reference = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", on_epoch_end=interrupt_after(1, 0))
    resumed = run(tmp_path / "resumed")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_an_ensemble_of_cat_heads_trains_and_reloads(random_backbone, digits_tasks, tmp_path):
    params = make_params(method={"name": "apt", "ensemble": 2}, head={"name": "cat"}, train={"epochs": 1})
    model = build_model(params, random_backbone)
    IncrementalTrainer(model, digits_tasks.split, params.train, tmp_path, progress=False).run(
        every_fourth(digits_tasks.train), tasks=[0, 1]
    )
    assert [head.num_classes for head in model.head.heads] == [6, 6]
    assert not torch.equal(model.head.heads[0].weight, model.head.heads[1].weight)
    images = digits_tasks.test.images[:16]
    with torch.no_grad():
        logits = model.eval()(images)
        fresh = build_model(params, random_backbone)
        load_task_state(fresh, task_state_path(tmp_path, 1))
        torch.testing.assert_close(fresh.eval()(images), logits)
