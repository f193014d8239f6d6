"""Where APT's training step loses to the fwd+bwd limit: torch.profiler over both steps, kernel by kernel.

    python bench/profile_apt.py --out DIR         # ViT-B/16, 224 px, batch 256, bf16 (a CUDA device)

Both steps are the speed harness's (bench/harness/steps.py, as bench/speed.py times them): the trainer's
own step (autocast, linear head, masked cross-entropy, backward, Adam) with the limit's input-level vector or
with APT's per-block CLS key/value prompt. Prints each step's rate (harness.timing.measure), then the device
time per step by operator and by kernel name, sorted by APT's excess over the limit, and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from promptcil.prompts import create_method
from promptcil.runtime import resolve_device

from harness.inputs import QUICK_BACKBONE, Batches, Run
from harness.models import InputPrompt, build_model, method_config
from harness.steps import train_step
from harness.timing import measure, release


def device_ms(run: Run, step, steps: int) -> dict[str, dict[str, float]]:
    """Device milliseconds per step over `steps` profiled steps, by operator (the device time of the kernels
    an operator launched itself) and by kernel name (CPU time by operator on a CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        run.sync()
    by: dict[str, dict[str, float]] = {"operator": defaultdict(float), "kernel": defaultdict(float)}
    cuda = run.device.type == "cuda"
    for event in prof.key_averages():
        # on a CPU (--quick) the operators' own CPU time stands in, so the tables are exercised there too
        device_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if device_us:
            kind = "operator" if event.device_type.name == "CPU" else "kernel"
            by[kind][event.key] += device_us / 1e3 / steps
    return {kind: dict(values) for kind, values in by.items()}


def excess_table(limit: dict[str, float], apt: dict[str, float], what: str, rows: int) -> str:
    keys = sorted(set(limit) | set(apt), key=lambda k: apt.get(k, 0) - limit.get(k, 0), reverse=True)
    lines = [f"| {what} | limit ms/step | APT ms/step | APT - limit |", "|---|---:|---:|---:|"]
    for key in keys[:rows] + [k for k in keys[-3:] if k not in keys[:rows]]:
        lines.append(f"| {key[:90]} | {limit.get(key, 0):.3f} | {apt.get(key, 0):.3f} | "
                     f"{apt.get(key, 0) - limit.get(key, 0):+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a 2-block ViT-Tiny at 32 px (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device("auto")
    model_name = "vit_tiny_patch16_224" if args.quick else args.model
    overrides = QUICK_BACKBONE if args.quick else {"img_size": 224, "patch_size": 16}
    run = Run(device, 8 if args.quick else args.batch_size, overrides, steps=4 if args.quick else 20,
              repeats=2 if args.quick else 5, warmup=1 if args.quick else 5)
    backbone = run.backbone(model_name)
    batches = Batches.random(run, backbone.patch_embed.proj.in_channels, tuple(backbone.patch_embed.img_size))
    result: dict = {"model": model_name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "rates": {}, "device_ms_per_step": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in ("limit", "apt"):
            method = InputPrompt(backbone) if variant == "limit" else create_method(method_config("apt"), backbone)
            model = build_model(run, backbone, method)
            step = train_step(run, model, batches, Path(scratch))
            result["rates"][variant] = measure(run, step, run.batch_size)
            result["device_ms_per_step"][variant] = device_ms(run, step, args.steps)
            model.method.detach()
            del model, step
            release(run)
    limit, apt = result["device_ms_per_step"]["limit"], result["device_ms_per_step"]["apt"]
    print(f"{model_name}, batch {run.batch_size}: limit {result['rates']['limit']['ms_per_step']:.1f} ms/step, "
          f"APT {result['rates']['apt']['ms_per_step']:.1f} ms/step "
          f"({result['rates']['apt']['img_per_s'] / result['rates']['limit']['img_per_s']:.3f}x)")
    print(f"device time per step (kernels): limit {sum(limit['kernel'].values()):.1f} ms, "
          f"APT {sum(apt['kernel'].values()):.1f} ms\n")
    print(excess_table(limit["operator"], apt["operator"], "operator", 15) + "\n")
    print(excess_table(limit["kernel"], apt["kernel"], "kernel", 10))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile-apt-{model_name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
