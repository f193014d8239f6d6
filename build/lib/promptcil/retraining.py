"""A retrain: the champion's version plus the incoming classes, as one new task (flows/retrain.py drives it).

It starts from the champion's prompt, head, backbone and params (a registry version carries them all),
trains on the new classes' images only, scores the grown model on every class seen (the champion's
held-out images plus the new classes' held-out part) and writes the files a new version carries. Its
work folder is resumable, and only by the same champion, params and incoming images (a producer record).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptcil.artifacts import ArtifactKind, load_tensors, read_json, save_tensors, write_json
from promptcil.config import Params, load_params
from promptcil.data import ImageSet, TaskSplit
from promptcil.evaluation import accuracy_row, base_new_summary, next_task_class_mean_accuracy, summarize
from promptcil.incoming import IncomingClasses
from promptcil.model import IncrementalModel
from promptcil.plots import write_accuracy_plots
from promptcil.provenance import artifact_sha256, producer_record
from promptcil.runtime import resolve_device
from promptcil.serving import load_version_model, version_artifacts
from promptcil.training import IncrementalTrainer, TaskLog, task_state_path


@dataclass
class Champion:
    """A registered version's files, downloaded: what a retrain starts from."""

    version: str
    folder: Path
    params: Params
    tasks: dict[str, Any]
    test: ImageSet
    test_metadata: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def read(cls, version: str, folder: Path) -> Champion:
        tasks = read_json(folder / "tasks.json")
        tensors, manifest = load_tensors(folder / "test.safetensors", kind=ArtifactKind.IMAGE_DATA)
        return cls(version, folder, load_params(folder / "params.yaml"), tasks,
                   ImageSet(tensors["images"], tensors["labels"], tasks["class_names"]), manifest["metadata"],
                   read_json(folder / "metrics.json"))

    @property
    def split(self) -> TaskSplit:
        return TaskSplit.from_dict(self.tasks["split"])

    @property
    def task_state(self) -> Path:
        return task_state_path(self.folder, self.split.num_tasks - 1)

    @property
    def backbone(self) -> Path:
        return self.folder / "backbone"


@dataclass
class Retrained:
    model: IncrementalModel
    split: TaskSplit  # the champion's tasks + the new one
    train: ImageSet  # the new classes' training images, incremental labels
    test: ImageSet  # every class seen: the champion's held-out images + the new classes'
    task_state: Path
    logs: list[TaskLog]


def run_folder(work_dir: Path, champion: Champion, incoming: IncomingClasses) -> Path:
    """One folder per (champion, new classes): a crashed run resumes there at the next schedule."""
    key = hashlib.sha256(json.dumps([champion.version, incoming.names]).encode()).hexdigest()[:12]
    return Path(work_dir) / f"v{champion.version}-{key}"


def train_new_task(champion: Champion, incoming: IncomingClasses, run_dir: Path, project: Params, *,
                   progress: bool = False) -> Retrained:
    """Grow the champion by one task holding the incoming classes and train it on their images only."""
    split = champion.split
    seen = split.task_classes(split.num_tasks - 1).stop
    new_ids = list(range(max(split.class_order) + 1, max(split.class_order) + 1 + len(incoming.names)))
    grown = TaskSplit(split.class_order + new_ids, split.task_sizes + [len(new_ids)])
    p = champion.params
    model = load_version_model(p, champion.backbone, champion.task_state)
    train = ImageSet(incoming.train.images, incoming.train.labels + seen, incoming.names)
    test = ImageSet(torch.cat([champion.test.images, incoming.test.images]),
                    torch.cat([champion.test.labels, incoming.test.labels + seen]),
                    champion.tasks["class_names"] + incoming.names)
    producer = producer_record(
        {"champion": champion.version, "method": p.method.model_dump(mode="json"),
         "head": p.head.model_dump(mode="json"), "train": p.train.model_dump(mode="json"),
         "test_fraction": project.retrain.test_fraction, "split_seed": project.train.seed},
        {"champion_state": artifact_sha256(champion.task_state), "incoming": incoming.sha256},
    )
    new_task = grown.num_tasks - 1
    trainer = IncrementalTrainer(model, grown, p.train, run_dir, resolve_device(p.train.device), progress=progress,
                                 producer=producer)
    logs = trainer.run(train, tasks=[new_task], resume=True)
    return Retrained(model, grown, train, test, task_state_path(run_dir, new_task), logs)


def evaluate_retrained(champion: Champion, retrained: Retrained, incoming: IncomingClasses) -> dict[str, Any]:
    """The champion's accuracy matrix plus the new task's row on every class seen; the gate reads the new
    row's last entry as the incoming classes' held-out accuracy."""
    p, grown = champion.params, retrained.split
    device = resolve_device(p.train.device)
    new_task = grown.num_tasks - 1
    new_row = accuracy_row(retrained.model, retrained.task_state, new_task, retrained.test, grown, p.eval.batch_size,
                           device)
    old = champion.metrics
    matrix = [row + [None] for row in old["accuracy_matrix"]] + [new_row]
    counts = old["test_samples_per_task"] + [len(incoming.test)]
    metrics = summarize(matrix, counts)
    metrics |= {"method": p.method.name, "head": p.head.name, "test_samples_per_task": counts,
                "retrained_from": champion.version, "incoming_accuracy": new_row[-1]}
    if "next_task_class_mean_after_task" in old:
        # DePT's base/new, continued: how the untrained champion's class means separate the incoming classes
        # among themselves (a single new class has no "among": None)
        last = champion.split.num_tasks - 1
        champion_next = None if len(incoming.names) < 2 else next_task_class_mean_accuracy(
            retrained.model, champion.task_state, last, retrained.train, retrained.test, grown, p.eval.batch_size,
            device)
        metrics |= base_new_summary(metrics["accuracy_after_task"],
                                    old["next_task_class_mean_after_task"][:-1] + [champion_next, None])
    return metrics


def write_version(out: Path, champion: Champion, retrained: Retrained, metrics: dict[str, Any]) -> dict[str, str]:
    """The new version's files (tasks, held-out images, metrics, plots) under `out`; returns its artifacts
    as `serving.version_artifacts` names them."""
    grown, test = retrained.split, retrained.test
    write_json(out / "tasks.json", {**champion.tasks, "split": grown.to_dict(), "num_tasks": grown.num_tasks,
                                    "class_names": test.class_names})
    save_tensors(out / "test.safetensors", {"images": test.images, "labels": test.labels},
                 kind=ArtifactKind.IMAGE_DATA, metadata={**champion.test_metadata, "class_names": test.class_names})
    write_json(out / "metrics.json", metrics)
    write_accuracy_plots(metrics, out)
    return version_artifacts(params=champion.folder / "params.yaml", backbone=champion.backbone,
                             task_state=retrained.task_state, tasks=out / "tasks.json",
                             eval_set=out / "test.safetensors", metrics=out / "metrics.json")
