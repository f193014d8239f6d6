"""Incremental training: task by task, on that task's data only (rehearsal-free).

Per task: the head grows by the task's classes, a fresh optimizer trains the prompt and head for
`train.epochs` on the head's loss (by default cross-entropy with earlier classes' logits masked), then
the task ends: the method ends it (APT merges its prompt), the head sees the task's features as
inference computes them and ends it (class means, ridge sums, alignment), and the task's state is
committed before the checkpoint that marks it done. A checkpoint is committed after every epoch;
`run(resume=True)` continues from the newest one and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from promptcil.compiling import compile_cache, should_compile
from promptcil.config.sections import TrainConfig
from promptcil.data import ImageSet, TaskSplit, device_batches, subset
from promptcil.data.augment import apply_crops, draw_crops
from promptcil.distributed import SINGLE, Ranks, all_reduce_sum_, broadcast_flag
from promptcil.heads import Head
from promptcil.model import IncrementalModel
from promptcil.provenance import producer_record
from promptcil.runtime import autocast_for, resolve_device
from promptcil.training.adaptation import first_session_adapter
from promptcil.training.checkpoints import CheckpointStore, ResumePoint
from promptcil.training.step import make_optimizer, set_epoch_lr, shuffle_seed, train_step

logger = logging.getLogger("promptcil")


@dataclass
class TaskLog:
    task: int
    classes: list[int]
    samples: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Wall-clock time of the task's training and ending (in this process, when it was resumed)."""
    end_seconds: float = 0.0
    """Of which the ending: the head's pass over the task's data, alignment, the method's end of task (0 for a
    task an earlier process finished: a diagnostic of this process, not kept in the task's state)."""


AUGMENT_STREAM = 1 << 40  # added to an epoch's shuffle seed: the seed of its crops and flips, another stream


class IncrementalTrainer:
    def __init__(
        self,
        model: IncrementalModel,
        split: TaskSplit,
        cfg: TrainConfig,
        out_dir: Path,
        device: torch.device | None = None,
        *,
        progress: bool = True,
        on_epoch_end: Callable[[int, int], None] | None = None,
        producer: dict[str, Any] | None = None,
        ranks: Ranks = SINGLE,
    ) -> None:
        """
        Args:
            out_dir: where task states (`task_XX.safetensors`) and `checkpoints/` go.
            on_epoch_end: called with (task, epoch) after each committed checkpoint.
            producer: what the run depends on (`provenance.producer_record`: params and input sha256s);
                only a folder written by the same producer is resumed. Default: the train config and the
                method's and head's names (callers that have input artifacts name them).
            ranks: several processes (promptcil.distributed): each trains on its shard of every batch, the
                gradients and the heads' sums are summed across ranks, and only rank 0 writes.
        """
        self.model = model
        self.split = split
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.ranks = ranks
        self.store = CheckpointStore(out_dir, producer or producer_record(
            {"train": cfg.model_dump(mode="json"), "method": model.method.method_name,
             "head": model.head.head_name}, {}))
        self.model.to(self.device)
        self.compiled = False

    # ---- data --------------------------------------------------------------
    def task_data(self, train_set: ImageSet, task: int) -> ImageSet:
        """The ONLY training data task `task` sees: its own classes' samples."""
        return subset(train_set, list(self.split.task_classes(task)))

    def task_loader(self, data: ImageSet, task: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of the task's batches on the device, in an order fixed by (seed, task, epoch)."""
        return device_batches(data, self.cfg.batch_size, self.device, shuffle=True,
                              seed=shuffle_seed(self.cfg.seed, task, epoch), ranks=self.ranks)

    # ---- main loop ---------------------------------------------------------
    def run(self, train_set: ImageSet, tasks: list[int] | None = None, *, resume: bool = True) -> list[TaskLog]:
        """Train `tasks` (default: all) in order; train_set carries incremental labels."""
        tasks = list(range(self.split.num_tasks)) if tasks is None else tasks
        self._compile_if_it_pays(train_set, tasks)
        ours = self.store.claim() if self.ranks.writer else False  # another producer's folder is emptied first
        ours = broadcast_flag(ours, self.ranks, self.device)  # every rank resumes, or none
        point = self.store.latest() if resume and ours else None
        if point is not None:
            logger.info("resuming from %s: task %d, epoch %d", self.store.checkpoints, point.task, point.epoch)
            self.model.load_trainable_state(point.model_state)
            self.model.to(self.device)
        logs: list[TaskLog] = []
        with self._progress_bar() as bar:
            for task in tasks:
                if point is not None and task < point.task:  # done before the interruption
                    logs.append(self._done_task_log(task))
                    continue
                here = point if point is not None and point.task == task and point.epoch > 0 else None
                logs.append(self._train_task(train_set, task, bar, here))
        return logs

    def _compile_if_it_pays(self, train_set: ImageSet, tasks: list[int]) -> None:
        """train.compile (promptcil.compiling): the steps counted are every task's when the head trains,
        else the first task's (an analytic head after it only observes)."""
        if self.compiled:
            return
        training = tasks if self.model.head.trainable else tasks[:1]
        counts = torch.bincount(train_set.labels, minlength=len(self.split.class_order))
        steps = self.cfg.epochs * sum(
            math.ceil(int(counts[list(self.split.task_classes(task))].sum()) / self.cfg.batch_size)
            for task in training)
        if should_compile(self.cfg.compile, self.device, steps):
            compile_cache()
            self.model.method.compile()  # in place: the step and predict call it unchanged
            self.compiled = True

    def _done_task_log(self, task: int) -> TaskLog:
        """A finished task's log, from its committed state, so a resumed run reports every task."""
        meta = self.store.task_metadata(task)
        return TaskLog(task=task, classes=list(self.split.task_classes(task)), samples=meta["train_samples"],
                       epoch_losses=list(meta["epoch_losses"]), seconds=float(meta.get("seconds", 0.0)))

    def _train_task(self, train_set: ImageSet, task: int, bar: Progress, point: ResumePoint | None) -> TaskLog:
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
        adapter = first_session_adapter(self.model, task, len(classes), self.cfg.seed,
                                        point.adapter_state if point is not None else None)
        if adapter is not None:
            adapter.to(self.device)
            groups = [{"params": list(self.model.method.parameters()) + list(adapter.parameters())}]
        elif self.model.head.trainable:
            groups = self.model.param_groups()
        else:
            groups = []
        if not groups:  # SimpleCIL, or an analytic head after the first task: the head only observes
            self._end_task(data, task, log, trained=False, started=started)
            return log
        optimizer = make_optimizer(self.cfg, groups)
        if point is not None and point.optimizer_state is not None:
            optimizer.load_state_dict(point.optimizer_state)
        batches = math.ceil(len(data) / self.cfg.batch_size)
        bar_id = bar.add_task(f"task {task}", total=self.cfg.epochs * batches, completed=start_epoch * batches)
        for epoch in range(start_epoch, self.cfg.epochs):
            log.epoch_losses.append(self._train_epoch(data, task, epoch, classes[0], optimizer, bar, bar_id, adapter))
            if epoch + 1 == self.cfg.epochs:
                self._end_task(data, task, log, trained=True, started=started)
            elif self.ranks.writer:
                self.store.save_checkpoint(
                    task, epoch + 1, task_done=False, model_state=self.model.trainable_state(), optimizer=optimizer,
                    losses=log.epoch_losses, adapter_state=None if adapter is None else adapter.state_dict())
            if self.on_epoch_end is not None:
                self.on_epoch_end(task, epoch)
        bar.remove_task(bar_id)
        return log

    def _train_epoch(self, data: ImageSet, task: int, epoch: int, first_class: int, optimizer: torch.optim.Optimizer,
                     bar: Progress, bar_id: Any, adapter: Head | None) -> float:
        self.model.train()
        head = self.model.head if adapter is None else adapter
        set_epoch_lr(optimizer, self.cfg, epoch)
        total = torch.zeros((), device=self.device)
        count = 0
        augment = self.cfg.augment
        crops = torch.Generator().manual_seed(shuffle_seed(self.cfg.seed, task, epoch) + AUGMENT_STREAM)
        for step, (images, labels) in enumerate(self.task_loader(data, task, epoch)):
            batch = min(self.cfg.batch_size, len(data) - step * self.cfg.batch_size)  # the global batch's size
            if augment.enabled:  # drawn for the global batch on every rank; each rank crops its rows
                theta = draw_crops(augment, batch, crops)[self.ranks.shard(batch)]
                images = apply_crops(images, theta, self.model.preprocess.img_size)  # already on the device
            total += train_step(self.model, head, images, labels, first_class, optimizer, self.device,
                                share=len(labels) / batch, ranks=self.ranks,
                                every_rank_has_rows=batch >= self.ranks.world) * len(labels)
            count += len(labels)
            bar.advance(bar_id)
        if self.ranks.distributed:  # the epoch's mean loss over every rank's rows
            sums = torch.stack([total, torch.tensor(float(count), device=self.device)])
            all_reduce_sum_([sums], self.ranks)
            total, count = sums[0], int(sums[1].item())
        return float(total) / max(count, 1)  # one host sync per epoch

    def _end_task(self, data: ImageSet, task: int, log: TaskLog, *, trained: bool, started: float) -> None:
        """End the task (method, then head on inference's features), then commit its state BEFORE the
        checkpoint that marks it done."""
        ending = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(shuffle_seed(self.cfg.seed, task, -3))  # the head's alignment samples
            with torch.no_grad():
                self.model.method.end_task()
                self.model.eval()
                if self.model.head.observes:
                    self._show_task(data, training=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        log.seconds, log.end_seconds = now - started, now - ending
        if not self.ranks.writer:
            return
        self.store.save_task_state(task, self.model.trainable_state(), metadata={
            "task": task,
            "classes_seen": self.model.head.num_classes,
            "method": self.model.method.method_name,
            "head": self.model.head.head_name,
            "train_samples": log.samples,
            "epoch_losses": log.epoch_losses,
            "seconds": log.seconds,
        })
        self.store.save_checkpoint(task, self.cfg.epochs if trained else 0, task_done=True,
                                   model_state=self.model.trainable_state(), optimizer=None, losses=log.epoch_losses)

    @torch.no_grad()
    def _show_task(self, data: ImageSet, *, training: bool) -> None:
        """Pass the task's data through the model into the head's `observe`, then `end_task`: in training
        mode the features the steps will see (APT's current prompt), else the ones inference sees."""
        self.model.train(training)
        for images, labels in device_batches(data, 256, self.device, ranks=self.ranks):
            if len(labels):
                with autocast_for(self.device):
                    features = self.model.features(images)
                self.model.head.observe(features.float(), labels)
        all_reduce_sum_(self.model.head.partial_sums(), self.ranks)  # every rank's rows in every rank's sums
        self.model.head.end_task()

    def _progress_bar(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not (self.progress and self.ranks.writer), transient=True)
