"""The CIL accuracy matrix: every task's state on every task seen so far, predicting over all classes seen."""

from __future__ import annotations

from pathlib import Path

import torch

from promptcil.data import ImageSet, TaskSplit, device_batches, subset
from promptcil.distributed import gather_rows, shard_of
from promptcil.model import IncrementalModel
from promptcil.runtime import HostSink, autocast_for
from promptcil.training import load_task_state


@torch.no_grad()
def predict(model: IncrementalModel, data: ImageSet, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted incremental labels for every image (CPU tensor), in data order (under torchrun each rank
    predicts its shard and every rank gets all of them)."""
    model.eval().to(device)
    local, ranks = shard_of(data)
    preds = []
    for images, _ in device_batches(local, batch_size, device):
        with autocast_for(device):
            preds.append(model.predict(images))
    mine = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)
    return gather_rows(mine, len(data), ranks, device).cpu()


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
    a prompt ensemble's K, else 1), as inference computes them (under torchrun: each rank its shard,
    every rank all of them)."""
    model.eval().to(device)
    local, ranks = shard_of(data)
    sink: HostSink | None = None  # copies batch by batch without the GPU waiting (its shape: the first batch's)
    for images, _ in device_batches(local, batch_size, device):
        with autocast_for(device):
            features = model.features(images)
        rows = features.float().view(-1, len(images), features.shape[-1]).transpose(0, 1)  # (B, members, D)
        if sink is None:
            sink = HostSink({"features": rows.shape[1:]}, len(local), batch_size, device)
        sink.put(features=rows)
    if sink is None:
        raise ValueError("features_of: no images")
    mine = sink.finish()["features"]  # (N, members, D)
    if ranks.distributed:
        mine = gather_rows(mine, len(data), ranks, device).cpu()
    return mine.transpose(0, 1)  # member-major, as the model emits them
