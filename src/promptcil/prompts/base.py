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

from typing import Callable, ClassVar

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from promptcil.config import MethodConfig

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
        """Install whatever the method needs inside the backbone (hooks). Default: nothing."""

    def detach(self) -> None:
        """Undo `attach`, leaving the backbone exactly as it was."""

    def end_task(self) -> None:
        """Called once after each task's training (e.g. APT merges its prompt)."""

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Edit the token sequence entering block `index`. Default: unchanged."""
        return tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions, exactly as timm's forward_features starts."""
        bb = self.backbone
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted CLS features (B, D) of normalised images; sets `aux_loss` if the method has one."""
        tokens = self.embed(images)
        for index, block in enumerate(self.backbone.blocks):
            tokens = block(self.before_block(index, tokens))
        tokens = self.backbone.norm(tokens)
        return self.backbone.forward_head(tokens, pre_logits=True)


def trunc_normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """timm/VPT's usual prompt init: truncated normal, cut at +-2 absolute (in effect a plain normal)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std))
