"""GPU speed harness (issue 7): promptcil's stages against what the hardware allows, in one run.

Plain forward and fwd+bwd limit baselines, every prompt method's training step and inference, GFLOPs, peak
memory, the features stage and time per task, each as a ratio to its baseline; what each measures and how is
bench/harness/ (its __init__ lists the modules). This script is the command line over it.

    python bench/speed.py                 # the device run: ViT-B/16 + ViT-S/16, 224 px, bf16, batch 256
    python bench/speed.py --quick         # CPU smoke test: a tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from promptcil.runtime import resolve_device

from harness.inputs import QUICK_BACKBONE, Run
from harness.provenance import REPO, code_digest
from harness.report import markdown
from harness.suite import run_suite


def comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="promptcil speed harness: plain/limit baselines, every prompt method's training step and "
        "inference, GFLOPs, peak memory, the features stage and time per task, in one run; writes "
        "speed-<date>-<device>.json and prints markdown tables with PASS/MISS per target.",
    )
    p.add_argument("--models", type=comma_list, default="vit_base_patch16_224,vit_small_patch16_224",
                   help="comma-separated timm ViT names, random weights (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=16, help="must match the models' names (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per measurement, after the warm-up (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="the timed steps are split into this many groups, each "
                   "timed as a whole; the median group gives the rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first call (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.compile of plain inference and of APT (train step, inference) on the "
                   "first model of --models, after everything else (default: on with CUDA, off on CPU)")
    p.add_argument("--features-batches", type=int, default=96,
                   help="batches in the features stage's pass (default: %(default)s)")
    p.add_argument("--task-model", default="vit_small_patch16_224",
                   help="model of the time-per-task runs (default: %(default)s)")
    p.add_argument("--tasks", type=lambda s: [int(t) for t in comma_list(s)], default="5,10,20",
                   help="comma-separated task counts of the time-per-task runs; '' skips them (default: %(default)s)")
    p.add_argument("--images-per-task", type=int, default=4096,
                   help="training images per task, 1 epoch (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when present), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 2-block vit_tiny at 32 px (ignores --img-size/--patch-size); the other "
                   "defaults become batch 4, 4 timed steps, 3 feature batches, tasks 2,4 of 16 images")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder of the JSON result (default: bench/results)")
    p.add_argument("--table", type=Path, metavar="JSON", help="only print the markdown tables of a saved result")
    p.add_argument("--code-digest", action="store_true",
                   help="only print the digest of this checkout's code, to match against a result's meta.code")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(models="vit_tiny_patch16_224", task_model="vit_tiny_patch16_224", batch_size=4, steps=4,
                       repeats=2, warmup=1, features_batches=3, tasks="2,4", images_per_task=16)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.code_digest:
        code = code_digest()
        print(code)
        return {"code": code}
    if args.table is not None:
        results = json.loads(args.table.read_text())
        print(markdown(results))
        return results
    started = time.perf_counter()
    device = resolve_device(args.device)
    overrides = QUICK_BACKBONE if args.quick else {"img_size": args.img_size, "patch_size": args.patch_size}
    run = Run(device, args.batch_size, overrides, args.steps, args.repeats, args.warmup)
    compiled = device.type == "cuda" if args.compile is None else args.compile
    return run_suite(run, models=args.models, features_batches=args.features_batches, task_model=args.task_model,
                     tasks=args.tasks, images_per_task=args.images_per_task, compiled=compiled, quick=args.quick,
                     out=args.out, started=started)


if __name__ == "__main__":
    main()
