"""Accuracy of every task's state on every seen task: the CIL accuracy matrix."""

from __future__ import annotations

from pathlib import Path

import torch

from promptcil.data import ImageSet, TaskSplit, make_loader, subset
from promptcil.model import IncrementalModel
from promptcil.runtime import autocast_for
from promptcil.train import load_task_state


@torch.no_grad()
def predict(model: IncrementalModel, data: ImageSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted incremental labels for every image (CPU tensor), in data order."""
    model.eval().to(device)
    loader = make_loader(data, batch_size, shuffle=False, seed=0, pin_memory=device.type == "cuda")
    preds = []
    for images, _ in loader:
        with autocast_for(device):
            preds.append(model.predict(images.to(device, non_blocking=True)))
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
