"""DePT's base/new measurement mapped to CIL: after each task, how well the model knows what it was trained
on (base) and how well its features alone separate the classes that come next (next-task class means)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from promptcil.data import ImageSet, TaskSplit, subset
from promptcil.evaluation.accuracy import features_of
from promptcil.evaluation.metrics import base_new_summary
from promptcil.model import IncrementalModel
from promptcil.training import load_task_state


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
