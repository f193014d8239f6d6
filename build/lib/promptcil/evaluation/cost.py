"""Cost measures: forward GFLOPs per image and parameter counts (machine-independent, unlike timings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def gflops_per_image(fn: Callable[[torch.Tensor], Any], example: torch.Tensor) -> float:
    """Forward GFLOPs per image of `fn` on a batch, counted by PyTorch's FLOP counter.

    Counting operators rather than timing them makes the cost claim (APT against a
    query-forward prompt pool) independent of the machine.
    """
    if example.ndim == 0 or example.shape[0] == 0:
        raise ValueError("example must be a non-empty batch with the batch dimension first")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(example)
    return counter.get_total_flops() / example.shape[0] / 1e9


def count_parameters(module: torch.nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameters, by default only those that train (the prompt cost on a frozen backbone)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
