"""Incremental trainer: task by task, on that task's data only (rehearsal-free).

Per task: the head grows by the task's classes, a fresh optimizer trains the
prompt and head for `train.epochs` on the head's loss (by default cross-entropy
with earlier classes' logits masked), the method closes the task (APT merges its
prompt), and the task's state is written as `task_XX.safetensors`. A checkpoint
is committed after every epoch; `resume` continues from the newest complete one
and ends bit-identical to an uninterrupted run, because every random choice
(shuffle order, new head rows) is a pure function of (seed, task, epoch) and the
learning rate of an epoch is computed, not carried in a scheduler object.
Only the producer that wrote the folder resumes it (`promptcil.provenance`): a
run with other params or inputs starts clean, so checkpoints of one
configuration never continue as another's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from promptcil.artifacts import ArtifactError, load_tensors, save_tensors, verify
from promptcil.config import TrainConfig
from promptcil.data import ImageSet, TaskSplit, device_batches, subset
from promptcil.heads import Head
from promptcil.heads.ensemble import EnsembleHead
from promptcil.heads.linear import LinearHead
from promptcil.model import IncrementalModel
from promptcil.provenance import claim, producer_record
from promptcil.runtime import autocast_for, resolve_device

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "checkpoint"
TASK_STATE_KIND = "task_state"
_CHECKPOINT_NAME = re.compile(r"ckpt-t(\d+)-e(\d+)\.safetensors$")


def task_state_path(out_dir: Path, task: int) -> Path:
    return out_dir / f"task_{task:02d}.safetensors"


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Parameters, or parameter groups as `IncrementalModel.param_groups` gives them (`lr_scale` kept)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def shuffle_seed(seed: int, task: int, epoch: int) -> int:
    return seed * 1_000_003 + task * 1_009 + epoch


@dataclass
class TaskLog:
    task: int
    classes: list[int]
    samples: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Wall-clock time of the task's training and closing (in this process, when it was resumed)."""


class IncrementalTrainer:
    def __init__(
        self,
        model: IncrementalModel,
        split: TaskSplit,
        cfg: TrainConfig,
        out_dir: Path,
        device: torch.device | None = None,
        progress: bool = True,
        on_epoch_end: Callable[[int, int], None] | None = None,
        producer: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            out_dir: where task states (`task_XX.safetensors`) and `checkpoints/` go.
            on_epoch_end: called with (task, epoch) after each committed checkpoint.
            producer: what the run depends on (`provenance.producer_record`: params and input sha256s);
                only a folder written by the same producer is resumed. Default: the train config and the
                method's and head's names (callers that have input artifacts name them).
        """
        self.model = model
        self.split = split
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.device = device or resolve_device(cfg.device)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.producer = producer or producer_record(
            {"train": cfg.model_dump(mode="json"), "method": model.method.method_name, "head": model.head.head_name}, {})
        self.model.to(self.device)
        if cfg.compile:
            self.model.method.compile()  # in place: the trainer's step and predict call it unchanged

    # ---- data --------------------------------------------------------------
    def task_data(self, train_set: ImageSet, task: int) -> ImageSet:
        """The ONLY training data task `task` sees: its own classes' samples."""
        return subset(train_set, list(self.split.task_classes(task)))

    def task_loader(self, data: ImageSet, task: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of the task's batches on the device, in an order fixed by (seed, task, epoch)."""
        return device_batches(data, self.cfg.batch_size, self.device, shuffle=True,
                              seed=shuffle_seed(self.cfg.seed, task, epoch))

    # ---- main loop ---------------------------------------------------------
    def run(self, train_set: ImageSet, tasks: list[int] | None = None, resume: bool = True) -> list[TaskLog]:
        """Train `tasks` (default: all) in order; train_set carries incremental labels."""
        tasks = list(range(self.split.num_tasks)) if tasks is None else tasks
        ours = claim(self.out_dir, self.producer)  # another producer's folder is emptied first
        point = self._load_latest_checkpoint() if resume and ours else None
        if point is not None:
            logger.info("resuming from %s: task %d, epoch %d", self.out_dir / "checkpoints", point.task, point.epoch)
        logs: list[TaskLog] = []
        with self._progress_bar() as bar:
            for task in tasks:
                if point is not None and task < point.task:  # done before the interruption
                    logs.append(self._done_task_log(task))
                    continue
                here = point if point is not None and point.task == task and point.epoch > 0 else None
                logs.append(self._train_task(train_set, task, bar, here))
        return logs

    def _done_task_log(self, task: int) -> TaskLog:
        """A finished task's log, from its committed state, so a resumed run reports every task."""
        meta = verify(task_state_path(self.out_dir, task))["metadata"]
        return TaskLog(task=task, classes=list(self.split.task_classes(task)), samples=meta["train_samples"],
                       epoch_losses=list(meta["epoch_losses"]), seconds=float(meta.get("seconds", 0.0)))

    def _train_task(self, train_set: ImageSet, task: int, bar: Progress, point: "_ResumePoint | None") -> TaskLog:
        started = time.perf_counter()
        data = self.task_data(train_set, task)
        classes = list(self.split.task_classes(task))
        log = TaskLog(task=task, classes=classes, samples=len(data))
        start_epoch = 0
        if point is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(shuffle_seed(self.cfg.seed, task, -1))
                self.model.head.add_classes(len(classes))
            self.model.to(self.device)
            if self.model.head.observes_before_training:  # e.g. the CAT head's matching prototypes
                self._show_task(data, training=True)
        else:
            start_epoch, log.epoch_losses = point.epoch, list(point.epoch_losses)
        adapter = self._first_session_adapter(task, len(classes), point)
        if adapter is not None:
            groups = [{"params": list(self.model.method.parameters()) + list(adapter.parameters())}]
        elif self.model.head.trainable:
            groups = self.model.param_groups()
        else:
            groups = []
        if not groups:  # SimpleCIL, or an analytic head after the first task: the head only observes
            self._finish_task(data, task, log, None, started)
            return log
        optimizer = self.make_optimizer(groups)
        if point is not None and point.optimizer_state is not None:
            optimizer.load_state_dict(point.optimizer_state)
        batches = math.ceil(len(data) / self.cfg.batch_size)
        epochs = self.cfg.epochs
        bar_id = bar.add_task(f"task {task}", total=epochs * batches, completed=start_epoch * batches)
        for epoch in range(start_epoch, epochs):
            log.epoch_losses.append(
                self._train_epoch(data, task, epoch, classes[0], optimizer, bar, bar_id, adapter)
            )
            if epoch + 1 == epochs:
                self._finish_task(data, task, log, optimizer, started)
            else:
                self._save_checkpoint(task, epoch + 1, False, optimizer, log.epoch_losses, adapter)
            if self.on_epoch_end is not None:
                self.on_epoch_end(task, epoch)
        bar.remove_task(bar_id)
        return log

    def _first_session_adapter(self, task: int, num_classes: int, point: "_ResumePoint | None") -> Head | None:
        """A temporary linear head for training the prompt on the first task when the model's head is
        analytic (prototype, ridge): RanPAC/APER's first-session adaptation. Afterwards the prompt is
        only used, never trained, so the analytic head sees features that stay fixed across tasks."""
        if self.model.head.trainable or task != 0 or not list(self.model.method.parameters()):
            return None
        # one linear head per prompt-ensemble member, like the model's own head: each member adapts its prompt
        members = len(self.model.head.heads) if isinstance(self.model.head, EnsembleHead) else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(shuffle_seed(self.cfg.seed, task, -2))
            linear = [LinearHead(self.model.method.embed_dim) for _ in range(members)]
            for head in linear:
                head.add_classes(num_classes)
        adapter = linear[0] if members == 1 else EnsembleHead(linear)
        if point is not None and point.adapter_state:
            adapter.load_grown_state(point.adapter_state)
        return adapter.to(self.device)

    def _finish_task(
        self, data: ImageSet, task: int, log: TaskLog, optimizer: torch.optim.Optimizer | None, started: float
    ) -> None:
        """Close the task, then commit its state BEFORE the checkpoint that marks it done."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(shuffle_seed(self.cfg.seed, task, -3))  # the head's alignment samples
            self._close_task(data)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.seconds = time.perf_counter() - started
        self._save_task_state(task, log)
        self._save_checkpoint(task, self.cfg.epochs if optimizer else 0, True, None, log.epoch_losses)

    def _train_epoch(self, data, task, epoch, first_class, optimizer, bar, bar_id, adapter=None) -> float:
        self.model.train()
        head = self.model.head if adapter is None else adapter
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(self.cfg, epoch) * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        count = 0
        for images, labels in self.task_loader(data, task, epoch):
            total += self.train_step(head, images, labels, first_class, optimizer) * len(labels)
            count += len(labels)
            bar.advance(bar_id)
        return float(total) / max(count, 1)  # one host sync per epoch

    def train_step(
        self, head: Head, images: torch.Tensor, labels: torch.Tensor, first_class: int, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        """One optimisation step on a batch of the task whose first class is `first_class`.

        `head` is the model's head or the first-session adapter. Returns the batch's mean loss as a
        device tensor: no host sync, so the loop can queue the next batch while the GPU works (and
        bench/speed.py times exactly this step).
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with autocast_for(self.device):
            loss = head.loss(self.model.features(images), labels, first_class)
            if self.model.method.aux_loss is not None:
                loss = loss + self.model.method.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def _close_task(self, data: ImageSet) -> None:
        self.model.method.end_task()
        self.model.eval()
        if self.model.head.observes:
            self._show_task(data, training=False)

    @torch.no_grad()
    def _show_task(self, data: ImageSet, training: bool) -> None:
        """Pass the task's data through the model into the head's `observe`, then `finish_task`: in training
        mode the features the steps will see (APT's current prompt), else the ones inference sees."""
        self.model.train(training)
        for images, labels in device_batches(data, 256, self.device):
            with autocast_for(self.device):
                features = self.model.features(images)
            self.model.head.observe(features.float(), labels)
        self.model.head.finish_task()

    def make_optimizer(self, params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
        return make_optimizer(self.cfg, params)

    def _progress_bar(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not self.progress,
            transient=True,
        )

    # ---- persistence -------------------------------------------------------
    def _save_task_state(self, task: int, log: TaskLog) -> None:
        save_tensors(
            task_state_path(self.out_dir, task),
            self.model.trainable_state(),
            kind=TASK_STATE_KIND,
            metadata={
                "task": task,
                "classes_seen": self.model.head.num_classes,
                "method": self.model.method.method_name,
                "head": self.model.head.head_name,
                "train_samples": log.samples,
                "epoch_losses": log.epoch_losses,
                "seconds": log.seconds,
            },
        )

    def _save_checkpoint(
        self,
        task: int,
        epoch: int,
        task_done: bool,
        optimizer: torch.optim.Optimizer | None,
        losses: list[float],
        adapter: Head | None = None,
    ) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.trainable_state().items()}
        if adapter is not None:
            tensors |= {f"adapter.{k}": v.detach().clone() for k, v in adapter.state_dict().items()}
        meta: dict[str, Any] = {"task": task, "epoch": epoch, "task_done": task_done, "epoch_losses": losses}
        if optimizer is not None and not task_done:
            opt_tensors, meta["optimizer"] = _split_optimizer_state(optimizer.state_dict())
            tensors |= opt_tensors
        ckpt_dir = self.out_dir / "checkpoints"
        path = ckpt_dir / f"ckpt-t{task:03d}-e{epoch:03d}.safetensors"
        save_tensors(path, tensors, kind=CHECKPOINT_KIND, metadata=meta)
        # keep only the newest committed checkpoint; manifests (the commit points) go first, so a kill
        # in between leaves an uncommitted payload, never a manifest whose payload is gone
        for old in sorted(ckpt_dir.glob("ckpt-*"), key=lambda p: p.suffix != ".json"):
            if old.stem != path.stem:
                old.unlink(missing_ok=True)

    def _load_latest_checkpoint(self) -> "_ResumePoint | None":
        """Apply the newest committed checkpoint to the model and say where to continue."""
        candidates = sorted(
            (int(m[1]), int(m[2]), p)
            for p in (self.out_dir / "checkpoints").glob("ckpt-*.safetensors")
            if (m := _CHECKPOINT_NAME.search(p.name))
        )
        for task, _epoch, path in reversed(candidates):
            try:
                tensors, manifest = load_tensors(path, kind=CHECKPOINT_KIND)
            except ArtifactError:
                continue  # an interrupted write: no manifest was committed for it
            meta = manifest["metadata"]
            model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            self.model.load_trainable_state(model_state)
            self.model.to(self.device)
            if meta["task_done"]:
                return _ResumePoint(task + 1, 0, None, [], {})
            optimizer_state = _join_optimizer_state(tensors, meta["optimizer"])
            adapter_state = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
            return _ResumePoint(task, meta["epoch"], optimizer_state, meta["epoch_losses"], adapter_state)
        return None


@dataclass
class _ResumePoint:
    task: int
    epoch: int  # epochs of `task` already done
    optimizer_state: dict[str, Any] | None
    epoch_losses: list[float]
    adapter_state: dict[str, torch.Tensor]  # first-session adaptation's temporary head, mid-task


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors + JSON (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_task_state(model: IncrementalModel, path: Path) -> dict[str, Any]:
    """Load a task's trained prompt + head into `model`; returns the manifest metadata."""
    tensors, manifest = load_tensors(path, kind=TASK_STATE_KIND)
    model.load_trainable_state(tensors)
    return manifest["metadata"]
