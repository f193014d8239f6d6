"""Classifier alignment for trained heads (Zhang et al., ICCV 2023, "SLCA: Slow Learner with Classifier
Alignment"; HiDe-Prompt does the same).

A head trained task by task with earlier classes' logits masked never sees two tasks' classes in one
softmax, so after the last task the newest classes and the oldest ones are scored on scales nobody
compared: on digits with the fractal backbone the masked linear head's A_last is 0.46, 0.89 once
aligned (docs/methods.md). Alignment keeps, per class seen, the mean and a compressed covariance of its
features — statistics, never an image — and after each task retrains the head on features drawn from
every seen class's Gaussian, all classes in one softmax.

The covariance is stored as probabilistic PCA: the top `rank` principal directions scaled by their
standard deviations, plus one isotropic variance for the rest (the mean of the remaining eigenvalues).
That is a covariance shrunk towards the isotropic one in the directions the class barely uses. Measured
on digits' frozen features (D = 48, 3 seeds, masked linear head 0.46): full covariance 0.89, rank 8 +
residual 0.89–0.90, diagonal 0.80, one pooled covariance 0.88. Memory at D = 768 and 1 000 classes:
full 2.2 GiB, rank 8 + residual 27 MiB, diagonal 5.9 MiB; rank 8 keeps the full covariance's accuracy at
1/80 of its memory (docs/methods.md).

A task's classes are accumulated as float64 sums (count, sum, sum of outer products: D^2 per class of the
current task only) while the trainer shows the head the task's data, and compressed when it ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from promptcil.config.base import Section


class AlignConfig(Section):
    """Classifier alignment (Slow Learner with Classifier Alignment, Zhang et al., ICCV 2023): after every
    task the trained head is retrained on features sampled from a Gaussian per class seen, so new classes
    stop winning over old ones by recency alone. Only the statistics are kept, never an image."""

    enabled: bool = Field(True, description="Align trained heads (linear, cat) after every task.")
    rank: int = Field(
        8, ge=0,
        description="Covariance per class: the top `rank` principal directions plus an isotropic residual "
        "(probabilistic PCA); (rank + 1) x D + 1 numbers per class (28 KiB at D = 768, rank 8; a full "
        "covariance is 2.3 MiB). 0: isotropic.",
    )
    samples_per_class: int = Field(256, gt=0, description="Features drawn per class seen, per alignment epoch.")
    epochs: int = Field(5, gt=0, description="Alignment epochs after every task.")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the alignment.")
    batch_size: int = Field(64, gt=0, description="Sampled features per alignment step.")


class ClassGaussians(nn.Module):
    """Per-class mean and low-rank-plus-isotropic covariance of features; buffers, so a head's state carries them."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, min(rank, dim)
        self.register_buffer("means", torch.empty(0, dim))
        self.register_buffer("factors", torch.empty(0, dim, self.rank))  # principal directions x their std
        self.register_buffer("residual_std", torch.empty(0))
        self._count: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._outside: torch.Tensor | None = None  # labels observed outside the current task

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def partial_sums(self, new_classes: int) -> list[torch.Tensor]:
        """The current task's count, sum and sum of outer products per class (float64), allocated for its
        `new_classes` classes: what `observe` adds to and several processes sum across ranks."""
        if self._sum is None:
            like = {"dtype": torch.float64, "device": self.means.device}
            self._count = torch.zeros(new_classes, **like)
            self._sum = torch.zeros(new_classes, self.dim, **like)
            self._outer = torch.zeros(new_classes, self.dim, self.dim, **like)
            self._outside = torch.zeros((), dtype=torch.int64, device=self.means.device)  # this rank's, not summed
        return [self._count, self._sum, self._outer]

    def observe(self, features: torch.Tensor, labels: torch.Tensor, new_classes: int) -> None:
        """Accumulate the current task's features; labels at or past `num_classes` are its `new_classes`.

        Nothing here waits for the device: a label outside the task is counted (and left out of the sums) and
        reported by `end_task`, and the outer products are one batched matrix product per batch (C x B x D^2
        multiply-adds for the task's C classes, a few milliseconds of float64 on a GPU even for a hundred
        classes), not a (B, D, D) tensor (1.2 GB at B = 256, D = 768) scattered row by row."""
        local = labels - self.num_classes
        inside = (local >= 0) & (local < new_classes)
        count, total, outer = self.partial_sums(new_classes)
        self._outside += (~inside).sum()
        member = F.one_hot(torch.where(inside, local, 0), new_classes).to(total) * inside[:, None]  # (B, C)
        x = features.detach().to(total)
        count += member.sum(dim=0)
        total += member.T @ x
        outer += (member.T[:, :, None] * x).transpose(1, 2) @ x  # (C, D, B) @ (B, D): each class's sum of x x^T

    def end_task(self, new_classes: int) -> None:
        """Compress the task's sums into its classes' means and covariance factors."""
        if self._outside is not None and int(self._outside) > 0:
            self._outside = None
            raise ValueError("class statistics: features of a class outside the current task")
        if self._count is None or self._count.shape[0] < new_classes or (self._count[:new_classes] < 2).any():
            raise ValueError("class statistics: every class of the task needs at least 2 training samples")
        count = self._count[:new_classes, None]
        mean = self._sum[:new_classes] / count
        covariance = (self._outer[:new_classes] - count[:, :, None] * mean[:, :, None] * mean[:, None, :]) / (
            count[:, :, None] - 1)
        # on the CPU (LAPACK, float64): CUDA's batched eigh failed to converge on an H200 for the near-singular
        # covariance of a random-init ViT-B's features (error 762); once per task, D x D, and the same result on
        # every device
        eigenvalues, vectors = (t.to(covariance.device) for t in torch.linalg.eigh(covariance.cpu()))  # ascending
        # an eigenvector's sign is arbitrary, and float rounding (another BLAS, sums in another order across
        # ranks) can flip it, which flips every feature drawn from it: fix it (largest component positive)
        largest = vectors.abs().argmax(dim=1, keepdim=True)
        vectors = vectors * vectors.gather(1, largest).sign()
        eigenvalues = eigenvalues.clamp_min(0)
        top = eigenvalues[:, self.dim - self.rank:]
        factors = vectors[:, :, self.dim - self.rank:] * top.sqrt()[:, None, :]
        rest = self.dim - self.rank
        residual = eigenvalues[:, :rest].sum(dim=1) / rest if rest else eigenvalues.new_zeros(new_classes)
        self.means = torch.cat([self.means, mean.to(self.means)])
        self.factors = torch.cat([self.factors, factors.to(self.factors)])
        self.residual_std = torch.cat([self.residual_std, residual.sqrt().to(self.residual_std)])
        self._count = self._sum = self._outer = self._outside = None

    def sample(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` features drawn from every class's Gaussian (global RNG), with their labels."""
        classes = self.num_classes
        like = {"device": self.means.device, "dtype": self.means.dtype}
        noise = torch.randn(classes, per_class, self.dim, **like)
        latent = torch.randn(classes, per_class, self.rank, **like)
        drawn = (self.means[:, None] + latent @ self.factors.transpose(1, 2)
                 + noise * self.residual_std[:, None, None])
        labels = torch.arange(classes, device=self.means.device).repeat_interleave(per_class)
        return drawn.reshape(-1, self.dim), labels

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.means.device
        for name in ("means", "factors", "residual_std"):
            setattr(self, name, torch.empty_like(state[name], device=device))
        self.load_state_dict(state)


def align_head(head: nn.Module, gaussians: ClassGaussians, cfg: AlignConfig,
               parameters: list[nn.Parameter] | None = None) -> None:
    """Retrain `head` (its `parameters`, default all) on features sampled from every seen class, all classes
    in one softmax, for cfg.epochs of cfg.samples_per_class per class (global RNG: the trainer seeds it)."""
    parameters = [p for p in (parameters or list(head.parameters())) if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
    was_training = head.training
    head.train()
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            features, labels = gaussians.sample(cfg.samples_per_class)
            order = torch.randperm(len(labels), device=labels.device)
            for batch in order.split(cfg.batch_size):
                loss = F.cross_entropy(head(features[batch]).float(), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    head.train(was_training)
