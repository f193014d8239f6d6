"""Where pretraining's two-GPU speed-up goes (issue 22): the pretraining step of `promptcil.pretrain` alone —
the same ViT, bf16 autocast, fused AdamW, DistributedDataParallel with gradient bucket views — timed on
device-resident batches (no loader), one GPU at the global batch and at half of it, then N ranks at the global
batch, under DDP variants. Splits the measured speed-up into the per-rank batch's effect and DDP's own.

    python bench/pretrain_step.py --nproc 2 --out DIR      # the device run (starts torchrun itself)
    python bench/pretrain_step.py --quick                  # CPU smoke test: gloo, a tiny ViT

Variants (each a fresh model): eager; `static_graph` (DDP's static graph); `bucket100` (100 MB buckets);
`bf16_hook` (gradients all-reduced in bf16: changes the numbers); `compiled` (the stage's: DDP around the
compiled model, one graph, the all-reduces after the backward; steady state after its compilation);
`compiled_split` (torch.compile of the DDP model, Dynamo's graph split at DDP's buckets so that their all-reduces
overlap the backward; AOTAutograd's cache refuses the split graphs). eager and compiled are built by the stage's
own `training_forward`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "src"), str(REPO)]

VARIANTS = ("eager", "static_graph", "bucket100", "bf16_hook", "compiled", "compiled_split")


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Inside torchrun (or one process): every variant's steady-state step, this rank's share of the batch."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from promptcil.backbone import create_vit
    from promptcil.config.sections import BackboneConfig
    from promptcil.data import DevicePreprocess
    from promptcil.distributed import Ranks
    from promptcil.pretrain import pretraining_step, training_forward

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    cfg = BackboneConfig(name=args.model, img_size=args.img_size, patch_size=args.patch_size,
                         **({"embed_dim": 48, "depth": 4, "num_heads": 3} if args.quick else {}))
    local = args.batch_size // world
    ranks = Ranks(int(os.environ.get("RANK", "0")), world, device.index or 0)
    results = []
    for variant in args.variants:
        torch.manual_seed(0)
        with torch.device(device):
            model = create_vit(cfg, num_classes=4)
        preprocess = DevicePreprocess.from_model(model).to(device)
        if variant in ("eager", "compiled"):
            forward = training_forward(model, device, ranks, compiled=variant == "compiled")
        else:  # DDP's knobs, and the compiled DDP model that Dynamo splits at DDP's buckets
            forward = DistributedDataParallel(
                model, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True,
                static_graph=variant == "static_graph", bucket_cap_mb=100 if variant == "bucket100" else None)
            if variant == "bf16_hook":
                forward.register_comm_hook(None, default_hooks.bf16_compress_hook)
            if variant == "compiled_split":
                forward = torch.compile(forward)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        images = torch.randint(0, 256, (local, 1, 28, 28), dtype=torch.uint8, device=device)
        labels = torch.randint(0, 4, (local,), device=device)

        def steps(count: int, forward: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
            started = time.perf_counter()
            for _ in range(count):  # promptcil.pretrain's step, on fixed device-resident batches
                pretraining_step(forward, optimizer, preprocess(images), labels, loss_scale=world / args.batch_size,
                                 label_smoothing=cfg.pretrain.label_smoothing, device=device)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - started

        warmup_s = steps(args.warmup, forward, optimizer)
        if world > 1:
            dist.barrier()
        seconds = steps(args.steps, forward, optimizer)
        results.append({"variant": variant, "world": world, "global_batch": args.batch_size, "rank_batch": local,
                        "step_ms": 1000 * seconds / args.steps, "img_per_s": args.batch_size * args.steps / seconds,
                        "warmup_s": warmup_s})
        del forward, model, optimizer
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    if world > 1:
        dist.destroy_process_group()
    return results


def launch(args: argparse.Namespace, nproc: int, batch_size: int, variants: list[str], out: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__)), "--worker", "--out", str(out), "--batch-size", str(batch_size),
               "--variants", ",".join(variants), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--model", args.model, "--img-size", str(args.img_size), "--patch-size", str(args.patch_size)]
    subprocess.run(command + (["--quick"] if args.quick else []), check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks for the DDP rows (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (default %(default)s)")
    p.add_argument("--model", default="vit_base_patch16_224", help="(default %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="(default %(default)s)")
    p.add_argument("--patch-size", type=int, default=16, help="(default %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: gloo, a 4-block ViT at 16 px")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON folder (default %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.patch_size, args.steps, args.warmup = "vit_tiny_patch16_224", 16, 4, 3, 1
    args.variants = args.variants.split(",")
    if args.worker:
        rows = measure(args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.out.write_text(json.dumps(rows))
        return {}
    import torch

    from harness.provenance import git_commit

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "pretrain-step-rows.json"
    single = [v for v in args.variants if v in ("eager", "compiled")]  # DDP's variants need ranks
    rows = launch(args, 1, args.batch_size, single, scratch)
    rows += launch(args, 1, args.batch_size // args.nproc, ["eager"], scratch)
    rows += launch(args, args.nproc, args.batch_size, args.variants, scratch)
    scratch.unlink()
    one = {r["variant"]: r for r in rows if r["world"] == 1 and r["global_batch"] == args.batch_size}
    half = next(r for r in rows if r["world"] == 1 and r["global_batch"] != args.batch_size)
    for r in rows:
        if r["world"] > 1:
            base = one.get(r["variant"].removesuffix("_split"), one["eager"])
            r["speedup"] = r["img_per_s"] / base["img_per_s"]
    report = {"meta": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                       "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                       "model": args.model, "img_size": args.img_size, "steps": args.steps, "warmup": args.warmup},
              "rows": rows,
              "split": {"half_batch_efficiency": half["img_per_s"] / one["eager"]["img_per_s"]}}
    print("| ranks | global batch | variant | step (ms) | img/s | speed-up vs 1 GPU (same variant) |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['world']} | {r['global_batch']} | {r['variant']} | {r['step_ms']:.1f} | {r['img_per_s']:,.0f} | "
              f"{r.get('speedup', float('nan')):.2f} |")
    print(f"one GPU at half the batch: {report['split']['half_batch_efficiency']:.3f} of its rate at the full batch")
    path = args.out / f"pretrain-step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"written: {path}")
    return report


if __name__ == "__main__":
    main()
