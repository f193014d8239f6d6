"""Linear head as in APT's code: LayerNorm then L2-normalised class rows, no bias.

It grows by a task's classes at a time. While a task trains, the trainer masks
the logits of earlier tasks' classes, so old rows receive no gradient and the
newest classes cannot push old ones down through the softmax. That leaves the
tasks' rows never compared with each other; classifier alignment (head.align,
on by default) compares them after every task on sampled features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcil.heads.alignment import AlignConfig, ClassGaussians, align_head
from promptcil.heads.base import Head, register_head


@register_head("linear")
class LinearHead(Head):
    def __init__(self, embed_dim: int, align: AlignConfig | None = None) -> None:
        """
        Args:
            align: classifier alignment after every task; None: the plain masked head (also the
                first-session adapter of analytic heads, which is dropped after task 0).
        """
        super().__init__(embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.weight = nn.Parameter(torch.empty(0, embed_dim))
        self.align = align if align is not None and align.enabled else None
        self.observes = self.align is not None
        self.gaussians = ClassGaussians(embed_dim, self.align.rank) if self.align else None

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> "LinearHead":
        return cls(embed_dim, cfg.align)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, count: int) -> None:
        bound = 1 / math.sqrt(self.embed_dim)  # nn.Linear's default init
        new_rows = torch.empty(count, self.embed_dim, device=self.weight.device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_rows]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(features) @ F.normalize(self.weight, dim=1).T.to(features.dtype)

    def partial_sums(self) -> list[torch.Tensor]:
        if self.gaussians is None:
            return []
        return self.gaussians.partial_sums(self.num_classes - self.gaussians.num_classes)

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.gaussians is not None:
            self.gaussians.observe(features, labels, self.num_classes - self.gaussians.num_classes)

    def end_task(self) -> None:
        if self.gaussians is not None and self.align is not None:
            self.gaussians.end_task(self.num_classes - self.gaussians.num_classes)
            align_head(self, self.gaussians, self.align)

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = nn.Parameter(torch.empty_like(state["weight"], device=self.weight.device))
        if self.gaussians is not None:
            self.gaussians.load_grown_state(
                {k.removeprefix("gaussians."): v for k, v in state.items() if k.startswith("gaussians.")})
        self.load_state_dict(state)
