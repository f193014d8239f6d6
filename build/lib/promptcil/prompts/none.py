"""SimpleCIL (Zhou et al. 2023): no prompt at all, the frozen backbone's CLS features.

It is the floor every prompt method must beat: with the prototype head it
stores nothing but class means.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from promptcil.prompts.base import PromptMethod, register_method


@register_method("none")
class NoPrompt(PromptMethod):
    @classmethod
    def from_config(cls, cfg: None, backbone: VisionTransformer) -> "NoPrompt":
        return cls(backbone)
