"""Lester's class-label init: task 0's class means of the tokens entering each block."""

from __future__ import annotations

from typing import Any

import torch

from promptcil.init.base import register_initialiser
from promptcil.prompts import PromptMethod
from promptcil.prompts.base import cycle_rows


@register_initialiser("class_prototype")
@torch.no_grad()
def class_prototype_init(method: PromptMethod, stats: dict[str, torch.Tensor], cfg: Any, seed: int) -> None:
    """Lester's class-label init: slot s of block b = class (s mod C)'s mean token entering block b;
    prompt-pool keys (L2P) = the classes' CLS means."""
    blocks, slots = method.token_slots()
    tokens = torch.stack([cycle_rows(stats["block_class_tokens"][b], slots) for b in blocks])
    method.set_slot_tokens(tokens, cfg.scale, stats["class_features"])
