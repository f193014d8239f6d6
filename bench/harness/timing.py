"""How a step is timed: measure (first call, warm-up, event-timed groups, peak memory), wall, release."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.inputs import Run


def measure(run: Run, step: Callable[[int], object], images_per_step: int) -> dict[str, Any]:
    """Throughput of `step(i)` (i picks the input buffer), peak memory, and the first call's time.

    The first call (compilation, library handles) is timed alone, then `warmup` more calls, then
    `repeats` groups of steps/repeats calls, each group timed as a whole (CUDA events around it,
    so gaps between steps count), and the median group gives the rate. No host sync inside a group.
    """
    cuda = run.device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(run.device)
        resting = torch.cuda.memory_allocated(run.device)
    run.sync()
    start = time.perf_counter()
    step(0)
    run.sync()
    first_call_s = time.perf_counter() - start
    for i in range(1, run.warmup + 1):
        step(i)
    per_group = max(1, run.steps // run.repeats)
    seconds: list[float] = []
    i = run.warmup + 1
    for _ in range(run.repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(per_group):
                step(i)
                i += 1
            end.record()
            end.synchronize()
            seconds.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            for _ in range(per_group):
                step(i)
                i += 1
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result: dict[str, Any] = {
        "img_per_s": per_group * images_per_step / median,
        "ms_per_step": median / per_group * 1e3,
        "spread": (max(seconds) - min(seconds)) / median,  # (slowest - fastest group) / median group
        "first_call_s": first_call_s,
        "timed_steps": per_group * run.repeats,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(run.device)
        result["peak_mib"] = peak / 2**20
        result["step_mib"] = (peak - resting) / 2**20  # what the step needs beyond weights and inputs
    return result


def wall(run: Run, fn: Callable[[], object]) -> float:
    """Wall-clock seconds of fn(), the device synchronized before and after."""
    run.sync()
    start = time.perf_counter()
    fn()
    run.sync()
    return time.perf_counter() - start


def release(run: Run) -> None:
    """Free the last section's tensors, so each section's peak memory is its own."""
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
