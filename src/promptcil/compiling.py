"""train.compile and backbone.pretrain.compile: whether a run compiles its forward (torch.compile), and where
the compiled artifacts are kept so that the next task, the next run and the next process reuse them.

`auto` compiles on CUDA when the run takes at least AUTO_MIN_STEPS optimizer steps. The basis
(docs/performance.md, H200, ViT-B/16, batch 256, the batch dimension compiled dynamic): a training task after
the first runs 1.20-1.23x faster compiled, ~17 ms saved per step (plus its share of the compiled inference
passes); compiling costs ~47 s in the first task with an empty cache and ~4 s with a warm one (inductor's and
AOTAutograd's caches hit, Dynamo still traces the Python): repaid after ~3000 steps cold, ~250 warm. The bar is
the cold one, so that a first run on a fresh machine is not made slower by the default. Pretraining saves more
per step (the whole ViT trains: 20 ms of 92 at batch 256, docs/scaling.md), so the same bar is safe there.
On a CPU compilation is never automatic (inductor's C++ build is minutes against seconds of training).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

AUTO_MIN_STEPS = 3000


def should_compile(setting: bool | str, device: torch.device, steps: int) -> bool:
    """`setting` is train.compile (true, false or "auto"); `steps` the optimizer steps the run will take."""
    if setting == "auto":
        return device.type == "cuda" and steps >= AUTO_MIN_STEPS
    return bool(setting)


def compile_cache() -> Path:
    """Point PyTorch's compile caches (inductor's FX graph cache, AOTAutograd's cache, autotuning results) at
    one folder that outlives the process: $TORCHINDUCTOR_CACHE_DIR when set, else the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache)/promptcil/torch-compile, rather than a /tmp folder that a reboot or a fresh
    container empties. Returns it."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "promptcil" / "torch-compile")
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True  # on by default in recent PyTorch; the run depends on it, so say so
    # AOTAutograd's cache refuses graphs that hold a custom autograd.Function unless allowed, and APT's prompt
    # add is one (prompts/apt.py: _AddToClsKeyValue): without this a warm run traces and partitions the joint
    # graph again. Safe here: Dynamo traces the Function's forward and backward into the graph the cache key
    # hashes, and its only state is an int that the trace bakes in.
    functorch.autograd_cache_allow_custom_autograd_functions = True
    return folder


def aot_cache_counts() -> dict[str, int]:
    """AOTAutograd's cache in this process so far: graphs it served (hit), compiled and saved (miss) and refused
    (bypass: compiled again every run). Dynamo's counters, the ones PyTorch's own cache tests read."""
    from torch._dynamo.utils import counters

    aot = counters["aot_autograd"]
    return {outcome: aot[f"autograd_cache_{outcome}"] for outcome in ("hit", "miss", "bypass")}
