"""Accuracy of every task's state on every seen task (the CIL accuracy matrix); DePT's base/new
measurement mapped to CIL: after each task, how well the model knows what it was trained on (base) and
how well its features alone separate the classes that come next (next_task_class_mean); and the joint
upper bound, the same head fitted on all classes at once on the final model's features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from promptcil.config import HeadConfig, TrainConfig
from promptcil.data import ImageSet, TaskSplit, device_batches, subset
from promptcil.heads import Head, create_head
from promptcil.heads.ensemble import EnsembleHead
from promptcil.metrics import base_new_summary
from promptcil.model import IncrementalModel
from promptcil.runtime import autocast_for
from promptcil.train import epoch_lr, load_task_state, make_optimizer


@torch.no_grad()
def predict(model: IncrementalModel, data: ImageSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted incremental labels for every image (CPU tensor), in data order."""
    model.eval().to(device)
    preds = []
    for images, _ in device_batches(data, batch_size, device):
        with autocast_for(device):
            preds.append(model.predict(images))
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)


def accuracy_row(
    model: IncrementalModel, task_state: Path, task: int, test_set: ImageSet, split: TaskSplit,
    batch_size: int, device: torch.device,
) -> list[float]:
    """[a[task][j] for j <= task]: the state after `task`, predicting over all classes it has seen."""
    load_task_state(model, task_state)
    seen = subset(test_set, list(split.seen_classes(task)))
    correct = predict(model, seen, batch_size, device) == seen.labels
    row = []
    for j in range(task + 1):
        in_task = torch.isin(seen.labels, torch.tensor(list(split.task_classes(j))))
        row.append(correct[in_task].float().mean().item())
    return row


def accuracy_matrix(
    model: IncrementalModel,
    task_states: list[Path],
    test_set: ImageSet,
    split: TaskSplit,
    batch_size: int,
    device: torch.device,
) -> tuple[list[list[float | None]], list[int]]:
    """a[i][j]: accuracy on task j's test classes after task i, predicting over ALL classes seen by i.

    Returns the matrix (None above the diagonal) and the test-sample count per task.
    """
    tasks = len(task_states)
    counts = [len(subset(test_set, list(split.task_classes(j)))) for j in range(tasks)]
    matrix: list[list[float | None]] = []
    for i, path in enumerate(task_states):
        row: list[float | None] = list(accuracy_row(model, path, i, test_set, split, batch_size, device))
        matrix.append(row + [None] * (tasks - i - 1))
    return matrix, counts


@torch.no_grad()
def features_of(model: IncrementalModel, data: ImageSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """The model's features of every image, (members, N, D) float32 on the CPU, in data order (members:
    a prompt ensemble's K, else 1), as inference computes them."""
    model.eval().to(device)
    chunks = []
    for images, _ in device_batches(data, batch_size, device):
        with autocast_for(device):
            features = model.features(images)
        chunks.append(features.float().view(-1, len(images), features.shape[-1]).cpu())  # member-major rows
    return torch.cat(chunks, dim=1)


def nearest_prototype_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor
) -> float:
    """Accuracy of cosine-to-class-mean predictions among the classes of `train_labels` only, the means
    computed from the train features (a prototype head fitted without training). Features (N, D) or
    (members, N, D): each member has its own means and the members' cosines are averaged, as an
    ensemble of prototype heads predicts."""
    if train_features.dim() == 2:
        train_features, test_features = train_features[None], test_features[None]
    classes = train_labels.unique()
    onehot = (train_labels[:, None] == classes[None]).double()
    means = torch.einsum("mnd,nc->mcd", train_features.double(), onehot) / onehot.sum(0)[None, :, None]
    cosine = F.normalize(test_features.double(), dim=-1) @ F.normalize(means, dim=-1).transpose(1, 2)
    return (classes[cosine.mean(0).argmax(1)] == test_labels).double().mean().item()


def next_task_class_mean_accuracy(
    model: IncrementalModel, task_state: Path, task: int, train_set: ImageSet, test_set: ImageSet,
    split: TaskSplit, batch_size: int, device: torch.device,
) -> float:
    """The state after `task`, untrained on task+1: its features' class means from task+1's TRAINING
    images, predicting task+1's test images among task+1's classes only (DePT's, i.e. CoOp's, new-class
    protocol). For the CAT head this is its matching head alone, the head DePT scores new classes with."""
    load_task_state(model, task_state)
    classes = list(split.task_classes(task + 1))
    train, test = subset(train_set, classes), subset(test_set, classes)
    return nearest_prototype_accuracy(
        features_of(model, train, batch_size, device), train.labels,
        features_of(model, test, batch_size, device), test.labels,
    )


def base_new(
    model: IncrementalModel, task_states: list[Path], accuracy_after_task: list[float], train_set: ImageSet,
    test_set: ImageSet, split: TaskSplit, batch_size: int, device: torch.device,
) -> dict[str, Any]:
    """Base, next-task class-mean accuracy and HM after every task (see `promptcil.metrics.base_new_summary`).
    Base after task t is the accuracy on the classes trained so far, `accuracy_after_task[t]`."""
    next_task: list[float | None] = [
        next_task_class_mean_accuracy(model, path, t, train_set, test_set, split, batch_size, device)
        for t, path in enumerate(task_states[:-1])
    ]
    return base_new_summary(accuracy_after_task, next_task + [None])


def joint_upper_bound(
    model: IncrementalModel, head_cfg: HeadConfig, train_cfg: TrainConfig, train_set: ImageSet, test_set: ImageSet,
    batch_size: int, device: torch.device,
) -> float:
    """A_last's ceiling on these features: a fresh head of the model's kind fitted on ALL classes of
    `train_set` at once (joint training, so no alignment), on the features the model has now (the frozen
    backbone's, the first-task-adapted prompt's, or the last task's prompt), scored on `test_set`.
    Analytic heads (prototype, ridge) are exact, so for them the bound equals A_last."""
    train_features = features_of(model, train_set, batch_size, device)  # (members, N, D)
    test_features = features_of(model, test_set, batch_size, device)
    members, _, dim = train_features.shape
    cfg = head_cfg.model_copy(update={"align": head_cfg.align.model_copy(update={"enabled": False})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        heads = [create_head(cfg, dim) for _ in range(members)]
        head: Head = (heads[0] if members == 1 else EnsembleHead(heads)).to(device)  # before it grows: its
        head.add_classes(int(train_set.labels.max()) + 1)  # running sums are made on its device
    labels = train_set.labels.to(device)

    def rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return features[:, index.cpu()].reshape(-1, dim).to(device)  # member-major, as the model emits them

    def show(training: bool) -> None:
        head.train(training)
        order = torch.arange(len(labels))
        for index in order.split(batch_size):
            head.observe(rows(train_features, index), labels[index.to(device)])
        head.finish_task()

    if head.observes_before_training:
        show(training=True)
    if head.trainable:
        optimizer = make_optimizer(train_cfg, head.param_groups())
        generator = torch.Generator().manual_seed(train_cfg.seed)
        head.train()
        for epoch in range(train_cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr(train_cfg, epoch) * group.get("lr_scale", 1.0)
            for index in torch.randperm(len(labels), generator=generator).split(train_cfg.batch_size):
                loss = head.loss(rows(train_features, index), labels[index.to(device)], 0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    if head.observes:
        with torch.no_grad():
            show(training=False)
    head.eval()
    with torch.no_grad():
        predictions = torch.cat([head(rows(test_features, index)).argmax(1).cpu()
                                 for index in torch.arange(len(test_set)).split(batch_size)])
    return (predictions == test_set.labels).float().mean().item()
