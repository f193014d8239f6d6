"""Time per incremental task: wall time per task of IncrementalTrainer.run against the number of tasks."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from promptcil.config import HeadConfig, TrainConfig
from promptcil.data import ImageSet, TaskSplit
from promptcil.heads import create_head
from promptcil.model import IncrementalModel
from promptcil.prompts import create_method
from promptcil.training import IncrementalTrainer

from harness.inputs import Run, random_imageset
from harness.models import method_config
from harness.timing import release


def bench_tasks(run: Run, name: str, task_counts: list[int], images_per_task: int, scratch: Path) -> dict[str, Any]:
    """Wall time per task of IncrementalTrainer.run (APT, linear head, 1 epoch) with T equal tasks of
    `images_per_task` images: rehearsal-free training touches only the new task's data, so it must
    not grow with T nor along a run. Task 0 (first calls) is kept out of the medians."""
    backbone = run.backbone(name)
    size = tuple(backbone.patch_embed.img_size)
    channels = backbone.patch_embed.proj.in_channels
    classes_per_task = 2
    one_task = random_imageset(images_per_task, channels, size, torch.zeros(images_per_task, dtype=torch.int64), 2)
    out: dict[str, Any] = {"model": name, "images_per_task": images_per_task, "epochs": 1, "method": "apt",
                           "runs": {}}
    for tasks in task_counts:
        # the same random images in every task (only speed is measured), each task with its own labels
        labels = torch.cat([t * classes_per_task + torch.arange(images_per_task) % classes_per_task
                            for t in range(tasks)])
        data = ImageSet(one_task.images.repeat(tasks, 1, 1, 1), labels,
                        [str(c) for c in range(tasks * classes_per_task)])
        split = TaskSplit(class_order=list(range(tasks * classes_per_task)), task_sizes=[classes_per_task] * tasks)
        torch.manual_seed(0)
        model = IncrementalModel(backbone, create_method(method_config("apt"), backbone),
                                 create_head(HeadConfig(), backbone.embed_dim))
        stamps: list[float] = []

        def task_done(task: int, epoch: int) -> None:
            run.sync()
            stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            cfg = TrainConfig(epochs=1, batch_size=run.batch_size)
            trainer = IncrementalTrainer(model, split, cfg, Path(folder), run.device, progress=False,
                                         on_epoch_end=task_done)
            run.sync()
            start = time.perf_counter()
            trainer.run(data, resume=False)
        task_s = [b - a for a, b in zip([start, *stamps], stamps)]
        later = task_s[1:] or task_s
        quarter = max(1, len(later) // 4)
        out["runs"][str(tasks)] = {
            "task_s": task_s,
            "median_s": statistics.median(later),
            "img_per_s": images_per_task / statistics.median(later),
            # late tasks against early ones within the run (tasks 1.. only)
            "growth": statistics.median(later[-quarter:]) / statistics.median(later[:quarter]),
        }
        print(f"  tasks={tasks}: {statistics.median(later):.3f} s/task (task 0: {task_s[0]:.3f} s)", flush=True)
        del data, model, trainer
        release(run)
    medians = [r["median_s"] for r in out["runs"].values()]
    out["spread_across_runs"] = max(medians) / min(medians)
    out["growth_in_longest_run"] = out["runs"][str(max(task_counts))]["growth"]
    return out
