"""The classifier interface: a head grows by whole tasks and scores all classes seen."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from promptcil.config import HeadConfig

HEADS: dict[str, type["Head"]] = {}


def register_head(name: str):
    def wrap(cls: type[Head]) -> type[Head]:
        cls.head_name = name
        HEADS[name] = cls
        return cls

    return wrap


def create_head(cfg: HeadConfig, embed_dim: int) -> "Head":
    return HEADS[cfg.name].from_config(cfg, embed_dim)


class Head(nn.Module):
    head_name: ClassVar[str] = ""
    trainable: ClassVar[bool] = True  # False: nothing to optimise, filled by `observe` instead

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    @classmethod
    def from_config(cls, cfg: HeadConfig, embed_dim: int) -> "Head":
        return cls(embed_dim)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def add_classes(self, count: int) -> None:
        """Make room for the next task's classes (incremental labels num_classes .. +count-1)."""
        raise NotImplementedError

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """See the trained features of the task that just ended (prototype heads build class means)."""

    def finish_task(self) -> None:
        """Called after `observe` has seen all of the task's data."""

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved at any task: resize to the saved number of classes first."""
        raise NotImplementedError
