"""VPT: Visual Prompt Tuning (Jia et al. 2022), shallow and deep.

N learnable tokens are inserted right after the CLS token. Shallow: once, at
the input of block 0. Deep: every block gets its own N tokens, replacing the
previous block's outputs at those positions. In the incremental loop the
prompt is shared by all tasks and keeps training.
"""

from __future__ import annotations

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from promptcil.config.base import Section
from promptcil.prompts.base import PromptMethod, register_method, rescale_rms, trunc_normal_parameter


class VptConfig(Section):
    length: int = Field(10, gt=0, description="Prompt tokens per prompted layer (N).")
    deep: bool = Field(True, description="Deep: new tokens at every block; shallow: only at the input.")
    init_std: float = Field(0.02, gt=0, description="Std of the truncated-normal initial prompt.")


@register_method("vpt", config=VptConfig)
class VisualPromptTokens(PromptMethod):
    supports_ensemble = True

    def __init__(
        self, backbone: VisionTransformer, length: int = 10, *, deep: bool = True, init_std: float = 0.02
    ) -> None:
        """
        Args:
            length: prompt tokens per prompted block (N).
            deep: a new set of tokens at every block (True) or only at the input (False).
        """
        super().__init__(backbone)
        if length <= 0:
            raise ValueError(f"method.vpt.length: must be positive, got {length}")
        self.length = length
        self.deep = deep
        self.init_std = init_std
        layers = self.depth if deep else 1
        # (prompted block, N, D)
        self.prompt_tokens = trunc_normal_parameter(layers, length, self.embed_dim, std=init_std)

    @classmethod
    def from_config(cls, cfg: VptConfig, backbone: VisionTransformer) -> "VisualPromptTokens":
        return cls(backbone, cfg.length, deep=cfg.deep, init_std=cfg.init_std)

    def token_slots(self) -> tuple[list[int], int]:
        """Block l's N tokens are inserted into the sequence entering block l (deep), or block 0's only."""
        return list(range(self.prompt_tokens.shape[0])), self.length

    @torch.no_grad()
    def set_slot_tokens(
        self, tokens: torch.Tensor, scale: float | None = None, class_features: torch.Tensor | None = None
    ) -> None:
        """The tokens themselves (they live where they came from); `scale`: per-block RMS, None keeps theirs."""
        self.prompt_tokens.copy_(tokens if scale is None else rescale_rms(tokens, scale))

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        if index > 0 and not self.deep:
            return tokens
        prompt = self.prompt_tokens[index].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        cls_token = tokens[:, :1]
        # block 0 receives [CLS, patches]; later blocks [CLS, previous prompts, patches]
        rest = tokens[:, 1:] if index == 0 else tokens[:, 1 + self.length :]
        return torch.cat([cls_token, prompt, rest], dim=1)
