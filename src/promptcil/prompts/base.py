"""The small interface every prompt method implements.

A method owns only its prompt tensors. It is attached to a frozen timm ViT and
runs the backbone's own modules in the backbone's own order, so the prompted
forward is still "tokens -> blocks -> norm -> CLS pooling"; a method changes
the token sequence between blocks (`before_block`) or installs hooks inside a
block (`attach`). The backbone is deliberately NOT a registered submodule: the
method's `parameters()` and `state_dict()` are the prompt alone, which is what
is trained, checkpointed and versioned.
"""

from __future__ import annotations

import weakref
from typing import Callable, ClassVar

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from promptcil.backbone import embed_tokens
from promptcil.config import MethodConfig

_OWNER = "_promptcil_prompt_method"  # backbone attribute: weak reference to the attached method

METHODS: dict[str, Callable[[MethodConfig, VisionTransformer], "PromptMethod"]] = {}


def register_method(name: str):
    """Class decorator: make a method selectable as `method.name` in params.yaml."""

    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        cls.method_name = name
        METHODS[name] = cls.from_config
        return cls

    return wrap


def create_method(cfg: MethodConfig, backbone: VisionTransformer) -> "PromptMethod":
    return METHODS[cfg.name](cfg, backbone)


class PromptMethod(nn.Module):
    method_name: ClassVar[str] = ""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone  # shared, frozen, not part of this module's state
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: VisionTransformer) -> "PromptMethod":
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    def attach(self) -> None:
        """Claim the backbone: install this method's hooks, removing those of any other method.

        Several models may share one frozen backbone (evaluation, retraining), but a
        backbone carries one method's hooks at a time; a model whose method lost the
        backbone refuses to run instead of silently mixing two prompts.
        """
        owner = self.backbone.__dict__.get(_OWNER)
        if owner is not None and owner() is not None and owner() is not self:
            owner().detach()
        self._install_hooks()
        self.backbone.__dict__[_OWNER] = weakref.ref(self)

    def detach(self) -> None:
        """Remove this method's hooks, leaving the backbone exactly as it was."""
        self._remove_hooks()
        owner = self.backbone.__dict__.get(_OWNER)
        if owner is not None and owner() is self:
            del self.backbone.__dict__[_OWNER]

    @property
    def attached(self) -> bool:
        owner = self.backbone.__dict__.get(_OWNER)
        return owner is not None and owner() is self

    def _install_hooks(self) -> None:
        """Install hooks inside the backbone's modules. Default: none."""

    def _remove_hooks(self) -> None:
        """Remove what `_install_hooks` installed."""

    def __call__(self, *args, **kwargs):
        if not self.attached:
            raise RuntimeError(
                f"{self.method_name}: the backbone is attached to another method; call attach() before using this one"
            )
        return super().__call__(*args, **kwargs)

    def end_task(self) -> None:
        """Called once after each task's training (e.g. APT merges its prompt)."""

    def init_from_class_tokens(self, block_class_tokens: torch.Tensor, class_features: torch.Tensor) -> None:
        """Set the prompt from class prototypes (the `class_prototype` initialiser).

        Args:
            block_class_tokens: (depth, C, D) per-class mean patch token entering each block.
            class_features: (C, D) per-class mean final CLS feature.
        Default: a method without prompt tensors has nothing to set.
        """

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Edit the token sequence entering block `index`. Default: unchanged."""
        return tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions, exactly as timm's forward_features starts."""
        return embed_tokens(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted CLS features (B, D) of normalised images; sets `aux_loss` if the method has one."""
        tokens = self.embed(images)
        for index, block in enumerate(self.backbone.blocks):
            tokens = block(self.before_block(index, tokens))
        tokens = self.backbone.norm(tokens)
        return self.backbone.forward_head(tokens, pre_logits=True)


def cycle_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows taken from `rows` in turn (one prototype per slot, cycling when slots outnumber classes)."""
    return rows[torch.arange(count) % rows.shape[0]]


def trunc_normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """timm/VPT's usual prompt init: truncated normal, cut at +-2 absolute (in effect a plain normal)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std))
