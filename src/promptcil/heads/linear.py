"""Linear head as in APT's code: LayerNorm then L2-normalised class rows, no bias.

It grows by a task's classes at a time. While a task trains, the trainer masks
the logits of earlier tasks' classes, so old rows receive no gradient and the
newest classes cannot push old ones down through the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from promptcil.heads.base import Head, register_head


@register_head("linear")
class LinearHead(Head):
    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.weight = nn.Parameter(torch.empty(0, embed_dim))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, count: int) -> None:
        bound = 1 / math.sqrt(self.embed_dim)  # nn.Linear's default init
        new_rows = torch.empty(count, self.embed_dim, device=self.weight.device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_rows]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(features) @ F.normalize(self.weight, dim=1).T.to(features.dtype)

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight = nn.Parameter(torch.empty_like(state["weight"], device=self.weight.device))
        self.load_state_dict(state)
