"""Class-incremental metrics from the accuracy matrix.

Definitions follow the CIL literature (docs/methods.md, "Metrics"), so numbers are
comparable with the papers: accuracy after a task is over all classes seen so far,
weighted by test samples; forgetting compares each old task's best accuracy before
the last task with its accuracy after it.
"""

from __future__ import annotations

from typing import Any

import torch


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of predicted labels (not logits: argmax first) against target labels."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}; "
            "pass predicted labels (logits.argmax(-1)), one per target"
        )
    if target.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined; pass at least one sample")
    return (pred == target).float().mean().item()


def _validate(acc_matrix: list[list[float | None]], test_counts: list[int]) -> None:
    """Reject matrices that would silently give wrong numbers (ragged, upper entries, percentages)."""
    num_tasks = len(acc_matrix)
    if num_tasks == 0:
        raise ValueError("acc_matrix is empty; evaluate after at least one task")
    if len(test_counts) != num_tasks:
        raise ValueError(f"test_counts has {len(test_counts)} entries but acc_matrix has {num_tasks} tasks")
    for j, count in enumerate(test_counts):
        if count <= 0:
            raise ValueError(f"test_counts[{j}] = {count}; every task needs at least one test sample")
    for i, row in enumerate(acc_matrix):
        if len(row) != num_tasks:
            raise ValueError(f"acc_matrix row {i} has {len(row)} entries; expected {num_tasks} (None for j > i)")
        for j, value in enumerate(row):
            if j > i and value is not None:
                raise ValueError(
                    f"acc_matrix[{i}][{j}] = {value} but task {j} is not trained after task {i}; "
                    "the matrix must be lower-triangular with None above the diagonal"
                )
            if j <= i and (value is None or not 0.0 <= value <= 1.0):
                raise ValueError(f"acc_matrix[{i}][{j}] = {value}; expected an accuracy in [0, 1]")


def summarize(acc_matrix: list[list[float | None]], test_counts: list[int]) -> dict:
    """A_last, A_avg and forgetting from the accuracy matrix a[i][j] (task j evaluated after training task i).

    Accuracy after task i is weighted by test samples per task, so it equals top-1
    accuracy on the pooled test set of all classes seen, as the papers report it.
    Forgetting is None for a single task, where it is undefined.
    """
    _validate(acc_matrix, test_counts)
    num_tasks = len(acc_matrix)
    after_task = [
        sum(test_counts[j] * acc_matrix[i][j] for j in range(i + 1)) / sum(test_counts[: i + 1])
        for i in range(num_tasks)
    ]
    last = num_tasks - 1
    forgetting = None
    if num_tasks > 1:
        drops = [
            max(acc_matrix[i][j] for i in range(j, last)) - acc_matrix[last][j] for j in range(last)
        ]
        forgetting = sum(drops) / len(drops)
    return {
        "accuracy_matrix": [list(row) for row in acc_matrix],
        "accuracy_after_task": after_task,
        # a[i][i]: what a task's training taught, right after it (0 for a model that never predicts its new classes)
        "newest_task_accuracy_after_task": [acc_matrix[i][i] for i in range(num_tasks)],
        "A_last": after_task[last],
        "A_avg": sum(after_task) / num_tasks,
        "forgetting": forgetting,
    }


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2 b n / (b + n), the base-to-new protocol's summary (0 when both are 0)."""
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def base_new_summary(base: list[float], next_task: list[float | None]) -> dict[str, Any]:
    """DePT's base-to-new protocol mapped to CIL. Per task t: base (accuracy on the classes trained so far),
    next_task_class_mean (the class-mean accuracy on task t+1's classes BEFORE training on them, from the
    features alone; None for the last task) and their harmonic mean HM; plus their means over the tasks
    that have a next task, so that the three averages cover the same tasks (None when none has)."""
    if len(base) != len(next_task):
        raise ValueError(f"base has {len(base)} tasks but next_task has {len(next_task)}")
    hm = [None if n is None else harmonic_mean(b, n) for b, n in zip(base, next_task)]
    defined = [t for t, n in enumerate(next_task) if n is not None]

    def mean(values: list[Any]) -> float | None:
        return sum(values[t] for t in defined) / len(defined) if defined else None

    return {
        "base_after_task": list(base),
        "next_task_class_mean_after_task": list(next_task),
        "HM_after_task": hm,
        "base_avg": mean(base),
        "next_task_class_mean_avg": mean(next_task),
        "HM_avg": mean(hm),
    }
