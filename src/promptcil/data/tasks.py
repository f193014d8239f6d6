"""Class-incremental task split: which classes arrive in which task.

Models see "incremental labels": the position of a class in the arrival order, so
the classes of task t are a contiguous range and a head grows by appending rows.
The split is saved as JSON (`tasks.json`) so every later stage uses the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptcil.data.sources import DataError, ImageSet


@dataclass(frozen=True)
class TaskSplit:
    """Class arrival order and the number of classes in each task (task 0 holds the base classes)."""

    class_order: list[int]
    """Original class ids in arrival order; the position of an id is its incremental label."""
    task_sizes: list[int]
    """Classes per task."""

    def __post_init__(self) -> None:
        if any(size <= 0 for size in self.task_sizes):
            raise DataError(f"tasks: every task needs classes, got task sizes {self.task_sizes}")
        if sum(self.task_sizes) != len(self.class_order):
            raise DataError(
                f"tasks: task sizes {self.task_sizes} add up to {sum(self.task_sizes)}, "
                f"not to the {len(self.class_order)} classes of class_order"
            )
        if len(set(self.class_order)) != len(self.class_order):
            raise DataError(f"tasks: class_order repeats class ids {_repeated(self.class_order)}")

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def task_classes(self, task: int) -> range:
        """Incremental labels learned in `task`."""
        self._check_task(task)
        start = sum(self.task_sizes[:task])
        return range(start, start + self.task_sizes[task])

    def seen_classes(self, task: int) -> range:
        """Incremental labels learned up to and including `task` (what evaluation after `task` covers)."""
        return range(0, self.task_classes(task).stop)

    def relabel(self, imageset: ImageSet) -> ImageSet:
        """Map original labels to incremental labels; samples of classes outside the order are dropped."""
        unknown = [c for c in self.class_order if not 0 <= c < len(imageset.class_names)]
        if unknown:
            raise DataError(
                f"data.class_order: class ids {unknown} are not among the "
                f"{len(imageset.class_names)} classes of the data"
            )
        lookup = torch.full((len(imageset.class_names),), -1, dtype=torch.int64)
        lookup[torch.tensor(self.class_order, dtype=torch.int64)] = torch.arange(len(self.class_order))
        new_labels = lookup[imageset.labels]
        keep = new_labels >= 0
        return ImageSet(
            images=imageset.images[keep],
            labels=new_labels[keep],
            class_names=[imageset.class_names[c] for c in self.class_order],
        )

    def to_dict(self) -> dict[str, Any]:
        return {"class_order": list(self.class_order), "task_sizes": list(self.task_sizes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSplit:
        try:
            return cls(class_order=[int(c) for c in d["class_order"]], task_sizes=[int(n) for n in d["task_sizes"]])
        except (KeyError, TypeError) as err:
            raise DataError(f"tasks: not a task split (needs class_order and task_sizes lists): {err!r}") from err

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise DataError(f"tasks: task {task} does not exist (the split has tasks 0..{self.num_tasks - 1})")


def _repeated(ids: Sequence[int]) -> list[int]:
    return sorted(c for c, n in Counter(ids).items() if n > 1)


def make_task_split(
    num_classes: int,
    base_classes: int,
    classes_per_task: int,
    seed: int,
    class_order: Sequence[int] | None = None,
) -> TaskSplit:
    """Split `num_classes` into a base task and equal incremental tasks.

    Without `class_order` the order is `np.random.RandomState(seed).permutation`:
    numpy's legacy stream is frozen across versions, and for 100 classes with seed
    1993 it gives the standard CIFAR-100 order of CIL papers (68, 56, 78, 8, ...).
    """
    if base_classes <= 0:
        raise DataError(f"data.base_classes: {base_classes} leaves task 0 with no classes")
    if classes_per_task <= 0:
        raise DataError(f"data.classes_per_task: {classes_per_task} leaves the incremental tasks with no classes")
    if base_classes > num_classes:
        raise DataError(f"data.base_classes: {base_classes} exceeds the {num_classes} classes of the data")
    incremental = num_classes - base_classes
    if incremental % classes_per_task:
        raise DataError(
            f"data.classes_per_task: {classes_per_task} does not divide the {incremental} incremental classes"
        )
    if class_order is None:
        order = [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    else:
        order = [int(c) for c in class_order]
        unknown = sorted({c for c in order if not 0 <= c < num_classes})
        if unknown:
            raise DataError(
                f"data.class_order: unknown class ids {unknown} (the data has classes 0..{num_classes - 1})"
            )
        if len(set(order)) != len(order):
            raise DataError(f"data.class_order: class ids {_repeated(order)} appear more than once")
        missing = sorted(set(range(num_classes)) - set(order))
        if missing:
            raise DataError(f"data.class_order: misses class ids {missing}; list every class exactly once")
    incremental_tasks = [classes_per_task] * (incremental // classes_per_task)
    return TaskSplit(class_order=order, task_sizes=[base_classes, *incremental_tasks])


def subset(imageset: ImageSet, classes: Sequence[int]) -> ImageSet:
    """Samples whose label is in `classes` (e.g. one task's incremental labels); labels are kept as they are."""
    keep = torch.isin(imageset.labels, torch.as_tensor(list(classes), dtype=torch.int64))
    if not bool(keep.any()):
        raise DataError(f"task has no samples for classes {list(classes)}")
    return imageset.take(keep.nonzero().flatten())
