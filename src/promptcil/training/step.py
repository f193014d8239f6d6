"""One optimisation step, the optimizer and the schedule: pure functions of the config, so a resume
is exact by construction (every random choice and learning rate is a function of (seed, task, epoch))."""

from __future__ import annotations

import math
from typing import Any

import torch

from promptcil.config.sections import TrainConfig
from promptcil.distributed import SINGLE, Ranks, all_reduce_gradients
from promptcil.runtime import autocast_for


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def shuffle_seed(seed: int, task: int, epoch: int) -> int:
    """The seed of task `task`'s epoch `epoch` (negative epochs name a task's other draws: -1 its new head
    rows, -2 the first-session adapter, -3 the head's alignment samples)."""
    return seed * 1_000_003 + task * 1_009 + epoch


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Parameters, or parameter groups as `IncrementalModel.param_groups` gives them (`lr_scale` kept)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = epoch_lr(cfg, epoch) * group.get("lr_scale", 1.0)


def train_step(model: Any, head: Any, images: torch.Tensor, labels: torch.Tensor, first_class: int,
               optimizer: torch.optim.Optimizer, device: torch.device, *, share: float = 1.0,
               ranks: Ranks = SINGLE, every_rank_has_rows: bool = True) -> torch.Tensor:
    """One step on a batch of the task whose first class is `first_class`, through `head` (the model's head
    or the first-session adapter). Returns the batch's mean loss as a device tensor: no host sync, so the
    loop queues the next batch while the GPU works (bench/speed.py times exactly this step).

    Several processes (`ranks`): this rank's rows are `share` of the global batch; its loss is weighted by
    it and the gradients summed across ranks, which gives the one-process step's gradient
    (`every_rank_has_rows`: no rank's shard of this batch is empty)."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    if len(labels):
        with autocast_for(device):
            loss = head.loss(model.features(images), labels, first_class)
            if model.method.aux_loss is not None:
                loss = loss + model.method.aux_loss
        (loss * share if ranks.distributed else loss).backward()
    else:  # a rank whose shard of a short last batch is empty still joins the gradient sum
        loss = torch.zeros((), device=device)
    all_reduce_gradients([p for group in optimizer.param_groups for p in group["params"]], ranks, device,
                         every_rank_has_rows=every_rank_has_rows)
    optimizer.step()
    return loss.detach()
