"""DePT's decoupled head (Zhang et al., CVPR 2024, arXiv 2309.07439, "DePT: Decoupled Prompt Tuning").

DePT finds that prompt tuning crowds base-task knowledge into the feature channels
the model shares with other tasks (channel bias), which hurts new classes. Its
Channel Adjusted Transfer (CAT) head gives that base-specific knowledge a space of
its own: a channel-wise affine transform of the features (scale 1 and bias 0 at
init) feeding a linear classifier over the trained classes. It trains jointly
with the model's matching head on

    lambda * CE(CAT) + (1 - lambda) * CE(match)             (lambda = 0.7)

and at test a trained class's logit is lambda * CAT + (1 - lambda) * match. The
authors' code fuses logits (the paper writes the fused probability); so does this
head. New classes, which the CAT classifier never trained on, are scored by the
matching head alone: in promptcil that is the base/new protocol's "new" accuracy
(promptcil.evaluation), which uses class prototypes only.

The mapping from CLIP to a ViT with class prototypes:
- matching head = prototype head: `logit_scale` * cosine(feature, class mean), the
  class means playing the part of CLIP's class text embeddings (CLIP's scale: 100);
- the CAT classifier is also fed the prototypes of the batch's labels, through a
  channel transform of their own, as DePT feeds it the labels' text features;
- it grows per task like the linear head, and the trainer's rehearsal-free rule
  holds for both parts: earlier tasks' logits are masked in both losses, so their
  rows get no gradient. The channel transforms are shared by all classes and keep
  training, as the prompt does.

Where the matching prototypes come from. A task's matching loss needs its classes'
prototypes before its first step, and they must live in the space the prompted
features live in. So the trainer passes the task's training data through the
current model (training mode: the prompt the steps will train) before the task
(`observes_before_training`), and again after it (inference mode, after e.g. APT's
merge), which replaces them with the class means of the final prompted features,
exactly what `PrototypeHead` stores; the second pass also feeds classifier alignment
(head.align, promptcil.heads.alignment), which retrains the CAT part on features sampled
from every seen class. Batch means were rejected (a batch may lack a
class, and they are noisy); the prototypes stage's frozen-backbone means were
rejected because they are not the prompted space that test time uses. Between the
two passes the prototypes are fixed anchors: the matching loss pulls the prompted
features to their class's start-of-task mean (in DePT the text side moves with its
own prompt; here no gradient flows into the prototypes). Earlier classes keep the
means stored at their task's end: nothing of their data is kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from promptcil.config.base import Section
from promptcil.heads.alignment import AlignConfig, ClassGaussians, align_head
from promptcil.heads.base import Head, mask_earlier_classes, register_head


class ChannelAffine(nn.Module):
    """x * scale + bias per channel; the identity at init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class CatConfig(Section):
    loss_weight: float = Field(
        0.7, ge=0, le=1,
        description="lambda of the joint loss lambda*CE_CAT + (1-lambda)*CE_match while a task trains (DePT: 0.7).",
    )
    fusion_weight: float = Field(
        0.7, ge=0, le=1,
        description="lambda at test: a trained class's logit is lambda*CAT + (1-lambda)*match (DePT: 0.7, the "
        "loss's lambda); 0: the matching (prototype) head alone, 1: the CAT head alone.",
    )
    logit_scale: float = Field(
        100.0, gt=0, description="Temperature of the matching head's cosine logits (CLIP's exp(logit_scale) = 100)."
    )
    lr_scale: float = Field(
        6.5, gt=0, description="The CAT head's learning rate as a multiple of train.lr (DePT: 6.5)."
    )


@register_head("cat", config=CatConfig)
class CatHead(Head):
    observes = True
    observes_before_training = True

    def __init__(
        self,
        embed_dim: int,
        loss_weight: float = 0.7,
        fusion_weight: float = 0.7,
        logit_scale: float = 100.0,
        lr_scale: float = 6.5,
        align: AlignConfig | None = None,
    ) -> None:
        """
        Args:
            loss_weight: lambda of the joint training loss (weight of the CAT part).
            fusion_weight: lambda of the test-time logit fusion (weight of the CAT part).
            logit_scale: temperature of the matching head's cosine logits.
            lr_scale: the CAT parameters' learning rate as a multiple of train.lr.
            align: classifier alignment of the CAT part after every task (None: off).
        """
        super().__init__(embed_dim)
        self.loss_weight = loss_weight
        self.fusion_weight = fusion_weight
        self.logit_scale = logit_scale
        self.lr_scale = lr_scale
        self.image_transform = ChannelAffine(embed_dim)
        self.prototype_transform = ChannelAffine(embed_dim)
        self.weight = nn.Parameter(torch.empty(0, embed_dim))
        self.bias = nn.Parameter(torch.empty(0))
        self.register_buffer("class_means", torch.empty(0, embed_dim))
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self.align = align if align is not None and align.enabled else None
        self.gaussians = ClassGaussians(embed_dim, self.align.rank) if self.align else None

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> "CatHead":
        c = cfg.cat
        return cls(embed_dim, c.loss_weight, c.fusion_weight, c.logit_scale, c.lr_scale, cfg.align)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, count: int) -> None:
        """New classifier rows as nn.Linear initialises them; their prototypes are zero until observed."""
        bound = 1 / math.sqrt(self.embed_dim)
        device = self.weight.device
        rows = torch.empty(count, self.embed_dim, device=device).uniform_(-bound, bound)
        bias = torch.empty(count, device=device).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), rows]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), bias]))
        self.class_means = torch.cat([self.class_means, self.class_means.new_zeros(count, self.embed_dim)])

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": self.lr_scale}]

    def partial_sums(self) -> list[torch.Tensor]:
        """The pass's per-class sums and counts, and after training the class statistics' sums."""
        if self._sums is None or self._counts is None:
            like = {"dtype": torch.float64, "device": self.class_means.device}
            self._sums = torch.zeros(self.num_classes, self.embed_dim, **like)
            self._counts = torch.zeros(self.num_classes, **like)
        sums = [self._sums, self._counts]
        if self.gaussians is not None and not self.training:  # the pass after training: inference's features
            sums += self.gaussians.partial_sums(self.num_classes - self.gaussians.num_classes)
        return sums

    def observe(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.partial_sums()
        self._sums.index_add_(0, labels, features.double())
        self._counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if self.gaussians is not None and not self.training:
            self.gaussians.observe(features, labels, self.num_classes - self.gaussians.num_classes)

    def end_task(self) -> None:
        """The observed classes' prototypes become the means just seen; other classes keep theirs. After
        training (inference mode), the task's class statistics are kept and the CAT part aligned."""
        assert self._sums is not None and self._counts is not None, "observe first"
        seen = self._counts > 0
        with torch.no_grad():
            self.class_means[seen] = (self._sums[seen] / self._counts[seen, None]).to(self.class_means.dtype)
        self._sums = self._counts = None
        if self.gaussians is not None and self.align is not None and not self.training:
            self.gaussians.end_task(self.num_classes - self.gaussians.num_classes)
            cat_parameters = [self.weight, self.bias, *self.image_transform.parameters()]
            align_head(self, self.gaussians, self.align, cat_parameters)

    def matching_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=1) @ F.normalize(self.class_means, dim=1).T

    def cat_logits(self, transformed: torch.Tensor) -> torch.Tensor:
        return F.linear(transformed, self.weight, self.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        cat = self.cat_logits(self.image_transform(features))
        return self.fusion_weight * cat + (1 - self.fusion_weight) * self.matching_logits(features)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, first_class: int) -> torch.Tensor:
        """lambda * CE of the CAT classifier on [the labels' prototypes; the images] + (1 - lambda) * CE of
        the matching head on the images, earlier tasks' logits masked in both."""
        features = features.float()
        samples = torch.cat([self.prototype_transform(self.class_means[labels]), self.image_transform(features)])
        cat = mask_earlier_classes(self.cat_logits(samples), first_class)
        match = mask_earlier_classes(self.matching_logits(features), first_class)
        return (self.loss_weight * F.cross_entropy(cat, labels.repeat(2))
                + (1 - self.loss_weight) * F.cross_entropy(match, labels))

    def load_grown_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.class_means.device
        self.weight = nn.Parameter(torch.empty_like(state["weight"], device=device))
        self.bias = nn.Parameter(torch.empty_like(state["bias"], device=device))
        self.class_means = torch.empty_like(state["class_means"], device=device)
        if self.gaussians is not None:
            self.gaussians.load_grown_state(
                {k.removeprefix("gaussians."): v for k, v in state.items() if k.startswith("gaussians.")})
        self.load_state_dict(state)
