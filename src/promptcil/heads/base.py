"""The classifier interface: a head grows by whole tasks and scores all classes seen."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from promptcil.registry import Registry

HEADS: Registry[type["Head"]] = Registry("head", "promptcil.heads")


def register_head(name: str, config: type[BaseModel] | None = None):
    """Class decorator: make a head selectable as `head.name`, with its settings `config` as `head.<name>`."""

    def wrap(cls: type[Head]) -> type[Head]:
        cls.head_name = name
        return HEADS.register(name, config)(cls)

    return wrap


def create_head(cfg: Any, embed_dim: int) -> "Head":
    """The head params' `head` section names (it reads its own `head.<name>` and the shared `head.align`)."""
    return HEADS[cfg.name].obj.from_config(cfg, embed_dim)


def mask_earlier_classes(logits: torch.Tensor, first_class: int) -> torch.Tensor:
    """Earlier tasks' classes (labels below `first_class`) take no part in this task's softmax: rehearsal-free
    training must neither push them down nor move their parameters."""
    if first_class == 0:
        return logits
    return logits.masked_fill(torch.arange(logits.shape[1], device=logits.device) < first_class, float("-inf"))


class Head(nn.Module):
    head_name: ClassVar[str] = ""
    trainable: bool = True  # False: nothing to optimise, filled by `observe` instead
    observes: bool = False  # True: the trainer shows it each task's features after training
    observes_before_training: bool = False  # True: ... and also before the task's first step (in training mode)

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> "Head":
        return cls(embed_dim)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def add_classes(self, count: int) -> None:
        """Make room for the next task's classes (incremental labels num_classes .. +count-1)."""
        raise NotImplementedError

    def loss(self, features: torch.Tensor, labels: torch.Tensor, first_class: int) -> torch.Tensor:
        """The training loss on a batch of the task whose first class is `first_class`: cross-entropy with
        earlier tasks' logits masked."""
        return F.cross_entropy(mask_earlier_classes(self(features).float(), first_class), labels)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's optional `lr_scale` multiplies train.lr for it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """See features of the current task's data (prototype heads build class means); heads with `observes`."""

    def partial_sums(self) -> list[torch.Tensor]:
        """The running sums `observe` adds this task's features to (allocated, in a fixed order): several
        processes (promptcil.distributed) sum them across ranks before `end_task`. Default: none."""
        return []

    def end_task(self) -> None:
        """Called after `observe` has seen all of the task's data."""

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved at any task: resize to the saved number of classes first."""
        raise NotImplementedError
