"""Prototype head (SimpleCIL): cosine similarity to class means of the final features.

Nothing is trained and nothing but the means is stored; a new task adds its
classes' means, computed from that task's data alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptcil.heads.base import Head, register_head


@register_head("prototype")
class PrototypeHead(Head):
    trainable = False
    observes = True

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim)
        self.register_buffer("class_means", torch.empty(0, embed_dim))
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.class_means.shape[0] + (0 if self._sums is None else self._sums.shape[0])

    def add_classes(self, count: int) -> None:
        device = self.class_means.device
        self._sums = torch.zeros(count, self.embed_dim, dtype=torch.float64, device=device)
        self._counts = torch.zeros(count, dtype=torch.float64, device=device)

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._sums is not None and self._counts is not None, "add_classes first"
        local = labels - self.class_means.shape[0]
        self._sums.index_add_(0, local, features.double())
        self._counts.index_add_(0, local, torch.ones_like(local, dtype=torch.float64))

    def partial_sums(self) -> list[torch.Tensor]:
        assert self._sums is not None and self._counts is not None, "add_classes first"
        return [self._sums, self._counts]

    def end_task(self) -> None:
        assert self._sums is not None and self._counts is not None, "add_classes first"
        if (self._counts == 0).any():
            missing = (self._counts == 0).nonzero().flatten() + self.class_means.shape[0]
            raise ValueError(f"prototype head: no training samples for classes {missing.tolist()}")
        means = (self._sums / self._counts[:, None]).to(self.class_means.dtype)
        self.class_means = torch.cat([self.class_means, means])
        self._sums = self._counts = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=1) @ F.normalize(self.class_means, dim=1).T

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        self.class_means = torch.empty_like(state["class_means"], device=self.class_means.device)
        self.load_state_dict(state)
