"""What is measured: the limit's InputPrompt, each method's config, and method + head on the shared backbone."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.config import HeadConfig, MethodConfig
from promptcil.heads import create_head
from promptcil.model import IncrementalModel
from promptcil.prompts import PromptMethod
from promptcil.prompts.base import trunc_normal_parameter

from harness.inputs import HEAD_CLASSES, Run


class InputPrompt(PromptMethod):
    """The training baseline: one learned vector added to every token entering block 0.

    Its gradient needs the backward through every block (activation gradients only), which is
    what every prompt method pays at least; deliberately not registered as a method.
    """

    method_name = "limit"

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__(backbone)
        self.input_prompt = trunc_normal_parameter(self.embed_dim, std=0.02)

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.input_prompt.to(tokens.dtype) if index == 0 else tokens


def method_config(name: str) -> MethodConfig:
    """The method's defaults, with VPT pinned to the issue's deep N=10 whatever the defaults become."""
    return MethodConfig.model_validate({"name": name, "vpt": {"length": 10, "deep": True}})


def build_model(run: Run, backbone: VisionTransformer, method: PromptMethod) -> IncrementalModel:
    """Method + linear head (grown to HEAD_CLASSES) on the shared backbone; attaching is the constructor's."""
    head = create_head(HeadConfig(), backbone.embed_dim)
    head.add_classes(HEAD_CLASSES)
    return IncrementalModel(backbone, method, head).to(run.device)
