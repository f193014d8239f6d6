"""Where compute runs: the device from params and the matching autocast (bf16 on CUDA, fp32 on CPU)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 matmuls are slow and change results."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
