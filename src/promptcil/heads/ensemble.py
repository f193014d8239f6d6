"""One head per member of a prompt ensemble (see prompts/ensemble.py).

Features arrive member-major, (K*B, D). While training, each member is trained on
its own loss (the mean of the members' losses is minimised); the prediction is the
mean of the members' logits: Lester's ensemble prediction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from promptcil.heads.base import Head


class EnsembleHead(Head):
    def __init__(self, heads: list[Head]) -> None:
        if len(heads) < 2 or len({type(h) for h in heads}) != 1:
            raise ValueError("method.ensemble: needs at least 2 heads of one kind")
        super().__init__(heads[0].embed_dim)
        self.heads = nn.ModuleList(heads)
        self.head_name = heads[0].head_name
        self.trainable = heads[0].trainable
        self.observes = heads[0].observes
        self.observes_before_training = heads[0].observes_before_training

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes

    def add_classes(self, count: int) -> None:
        for head in self.heads:
            head.add_classes(count)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(chunk) for head, chunk in zip(self.heads, features.chunk(len(self.heads)))]).mean(0)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, first_class: int) -> torch.Tensor:
        chunks = features.chunk(len(self.heads))
        return torch.stack([head.loss(chunk, labels, first_class) for head, chunk in zip(self.heads, chunks)]).mean()

    def param_groups(self) -> list[dict[str, Any]]:
        return [group for head in self.heads for group in head.param_groups()]

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        for head, chunk in zip(self.heads, features.chunk(len(self.heads))):
            head.observe(chunk, labels)

    def partial_sums(self) -> list[torch.Tensor]:
        return [tensor for head in self.heads for tensor in head.partial_sums()]

    def end_task(self) -> None:
        for head in self.heads:
            head.end_task()

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        for index, head in enumerate(self.heads):
            prefix = f"heads.{index}."
            head.load_grown_state({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
