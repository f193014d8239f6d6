"""Analytic ridge head after RanPAC (McDonnell et al., NeurIPS 2023).

Features pass through a fixed random projection and a nonlinearity into M
dimensions; the classifier is the ridge-regression solution
W = (G + lambda I)^-1 C, computed from running sums over all data seen:
the Gram matrix G = sum phi^T phi (M x M), C = sum phi^T y (M x classes,
one-hot targets) and the sample count. Adding a task only adds to the sums, so
after T tasks the head is exactly the head fitted on all T tasks at once,
whatever their order, and no sample is kept. The sums are float64 (they
accumulate over the whole stream); the projection is regenerated from its
seed, never stored.

Ridge strength: from params, or chosen after every task by generalised
cross-validation (GCV, Golub, Heath & Wahba 1979) over all data seen so far.
GCV needs only the sums: with G = V diag(s) V^T, the residual sum of squares
and the hat matrix's trace are functions of s, V^T C and the count. The choice
is therefore as exact and order-free as the sums themselves. Choosing once on a
held-out part of the first task (RanPAC's way, this head's earlier rule) fixed
a strength fit for two classes and ~270 images, which over-regularised the
later tasks: on digits with the fractal backbone it chose 10^4 and gave A_last
0.904 where GCV's choice gives 0.967 (docs/methods.md).

Memory: G holds M^2 float64 numbers (32 MiB at M = 2048); a task costs one pass
over its data (M^2 multiply-adds per sample) and one M x M eigendecomposition
(about 1 s at M = 2048 on 2 CPU cores).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from promptcil.config.base import Section
from promptcil.heads.base import Head, register_head

RIDGE_CANDIDATES = tuple(10.0 ** (k / 2) for k in range(-16, 29))  # 1e-8 .. 1e14, half a decade apart


def gcv_ridge(gram: torch.Tensor, targets: torch.Tensor, count: int) -> tuple[float, torch.Tensor]:
    """The candidate strength with the least GCV score, and the ridge solution at it, from the sums alone.

    GCV(l) = n * RSS(l) / (n - tr H(l))^2 with, for G = V diag(s) V^T and c = V^T C,
    RSS(l) = sum_j (l / (s_j + l))^2 |c_j|^2 / s_j + (n - sum_j |c_j|^2 / s_j) (one-hot targets: tr Y^T Y = n)
    and tr H(l) = sum_j s_j / (s_j + l), over the eigenvalues above numerical zero.
    """
    s, vectors = torch.linalg.eigh(gram)
    keep = s > s.max().clamp_min(1e-300) * 1e-10
    s, vectors = s[keep], vectors[:, keep]
    projected = vectors.T @ targets  # (rank, classes)
    energy = projected.pow(2).sum(dim=1)
    outside = (count - (energy / s).sum()).clamp_min(0)  # the part of Y no feature direction explains
    best_score, best = float("inf"), RIDGE_CANDIDATES[0]
    for ridge in RIDGE_CANDIDATES:
        shrink = ridge / (s + ridge)
        rss = (shrink.pow(2) * energy / s).sum() + outside
        dof = count - (s / (s + ridge)).sum()
        score = float(count * rss / dof.pow(2)) if dof > 0 else float("inf")
        if score < best_score:
            best_score, best = score, ridge
    weight = vectors @ (projected / (s + best)[:, None])
    return best, weight


class RidgeConfig(Section):
    projection_dim: int = Field(
        2048, gt=0, description="Width M of the fixed random projection (RanPAC: 10000 for ViT-B).")
    nonlinearity: Literal["relu", "identity"] = Field("relu", description="Applied after the projection.")
    seed: int = Field(0, description="The projection is regenerated from this seed, never stored.")
    ridge: float | None = Field(
        None, gt=0,
        description="Ridge strength; null: chosen after every task by generalised cross-validation from the "
        "running sums (all data seen so far; exact and order-invariant like the head itself).",
    )


@register_head("ridge", config=RidgeConfig)
class RidgeHead(Head):
    trainable = False
    observes = True

    def __init__(
        self,
        embed_dim: int,
        projection_dim: int = 2048,
        nonlinearity: str = "relu",
        seed: int = 0,
        ridge: float | None = None,
    ) -> None:
        """
        Args:
            projection_dim: M, the width of the random projection.
            nonlinearity: relu or identity, applied after the projection.
            seed: regenerates the projection.
            ridge: a fixed strength; None: chosen by GCV after every task.
        """
        super().__init__(embed_dim)
        self.nonlinearity = nonlinearity
        self.seed = seed
        self.fixed_ridge = ridge
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(embed_dim, projection_dim, generator=generator),
                             persistent=False)
        self.register_buffer("gram", torch.zeros(projection_dim, projection_dim, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(projection_dim, 0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(projection_dim, 0))
        self.register_buffer("ridge", torch.tensor(float("nan") if ridge is None else ridge, dtype=torch.float64))
        self._task_sums: list[torch.Tensor] | None = None  # this task's Gram matrix, targets, count

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> "RidgeHead":
        r = cfg.ridge
        return cls(embed_dim, r.projection_dim, r.nonlinearity, r.seed, r.ridge)

    @property
    def num_classes(self) -> int:
        return self.targets.shape[1]

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """phi(f): the random projection, then the nonlinearity."""
        projected = features.float() @ self.projection
        return F.relu(projected) if self.nonlinearity == "relu" else projected

    def add_classes(self, count: int) -> None:
        extra = torch.zeros(self.targets.shape[0], count, dtype=torch.float64, device=self.targets.device)
        self.targets = torch.cat([self.targets, extra], dim=1)
        self._task_sums = None

    def partial_sums(self) -> list[torch.Tensor]:
        """This task's Gram matrix, targets and count (added to the running sums when the task ends)."""
        if self._task_sums is None:
            like = {"dtype": torch.float64, "device": self.gram.device}
            self._task_sums = [torch.zeros_like(self.gram), torch.zeros_like(self.targets), torch.zeros((), **like)]
        return self._task_sums

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        gram, targets, count = self.partial_sums()
        phi = self.expand(features).double()
        gram += phi.T @ phi
        targets += phi.T @ F.one_hot(labels, self.num_classes).double()
        count += len(labels)

    def end_task(self) -> None:
        if self._task_sums is not None:
            for total, part in zip((self.gram, self.targets, self.count), self._task_sums):
                total += part
            self._task_sums = None
        if self.fixed_ridge is None:
            ridge, weight = gcv_ridge(self.gram, self.targets, int(self.count))
            self.ridge.fill_(ridge)
            self.weight = weight.float()
            return
        eye = torch.eye(self.gram.shape[0], dtype=torch.float64, device=self.gram.device)
        self.weight = torch.linalg.solve(self.gram + self.ridge * eye, self.targets).float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.expand(features) @ self.weight

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("targets", "weight"):
            setattr(self, name, torch.empty_like(state[name], device=self.gram.device))
        self.load_state_dict(state)
