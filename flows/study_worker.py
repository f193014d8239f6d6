"""Dask worker preload for study runs: `dask worker ADDRESS --preload flows.study_worker`.

A fresh worker pays for its first run's imports (torch, timm, the stages) and its CUDA context before the
run starts: measured 7 s on an H200 worker while the other worker had been warmed by the shared stages,
7 % of an 8-run grid on 2 GPUs. Importing this module at worker start (the study sets it for the local
clusters it starts) does that work while the shared stages run, so every worker takes its first run warm.
"""

from __future__ import annotations

from typing import Any

import torch

from flows import study  # noqa: F401  (the tasks' module: Prefect, the study runner, promptcil, timm)
from stages import evaluate, prompt_init, train  # noqa: F401


def dask_setup(worker: Any) -> None:
    """Create the CUDA context of the worker's GPU (dask-cuda has made it the first visible one)."""
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
