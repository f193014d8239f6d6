"""Lester's sampled vocabulary: real patch embeddings of task 0's images."""

from __future__ import annotations

from typing import Any

import torch

from promptcil.init.base import register_initialiser
from promptcil.init.tokens import draw_rows
from promptcil.prompts import PromptMethod


@register_initialiser("sampled_tokens")
@torch.no_grad()
def sampled_tokens_init(method: PromptMethod, stats: dict[str, torch.Tensor], cfg: Any, seed: int) -> None:
    """Lester's sampled vocabulary: every slot is a real patch embedding (the tokens entering block 0,
    the ViT's 'vocabulary') of task 0's images, drawn at random, whichever block the slot is in."""
    blocks, slots = method.token_slots()
    vocabulary = stats["block_token_sample"][0].flatten(0, 1)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.stack([draw_rows(vocabulary, slots, generator) for _ in blocks])
    method.set_slot_tokens(tokens, cfg.scale)
