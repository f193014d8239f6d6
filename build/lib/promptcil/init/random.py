"""The random initialiser (Lester's random baseline; VPT's usual init)."""

from __future__ import annotations

import math
from typing import Any

import torch

from promptcil.init.base import register_initialiser
from promptcil.prompts import PromptMethod


@register_initialiser("random")
@torch.no_grad()
def random_init(method: PromptMethod, stats: dict[str, torch.Tensor], cfg: Any, seed: int) -> None:
    """Lester's random baseline. trunc_normal at the method's own init_std keeps the method's seeded
    init; another scale or the uniform distribution (same std) redraws every prompt tensor."""
    if cfg.distribution == "trunc_normal" and cfg.scale is None:
        return
    std = cfg.scale if cfg.scale is not None else method.init_std
    generator = torch.Generator().manual_seed(seed)
    for parameter in method.prompt_parameters():
        if cfg.distribution == "uniform":
            bound = math.sqrt(3.0) * std  # uniform(-a, a) has std a / sqrt(3)
            values = torch.rand(parameter.shape, generator=generator) * (2 * bound) - bound
        else:
            values = torch.randn(parameter.shape, generator=generator).mul_(std).clamp_(-2.0, 2.0)
        parameter.copy_(values)
