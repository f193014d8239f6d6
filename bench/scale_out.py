"""Scale-out benchmark (issue 22): the torchrun stages on 1 and N GPUs, and a study on a Dask cluster of 1 and N
GPU workers, each through the product's own commands; speed-ups against their targets, JSON + a table.

    python bench/scale_out.py --data-root DIR                 # the device run: ViT-B/16, 224 px, bf16
    python bench/scale_out.py --data-root DIR --skip-study    # the stages only
    python bench/scale_out.py --stages pretrain --skip-study --pretrain-compile true   # compiled, warm cache
    python bench/scale_out.py --quick                         # CPU smoke test (gloo, a tiny ViT, digits)

Stages: one workspace (Fashion-MNIST B4 + 3 tasks of 2 at --img-size, random-init ViT pretrained for 12
epochs on the base classes, APT with the aligned linear head, one epoch per task); each of pretrain, features,
train and evaluate runs as `python -m stages.<stage>` with train.nproc = 1, then N (the stage starts
torchrun itself). A stage's rate is its images over the seconds its own record reports for the work (the
pass over the data; process start-up, imports and reading the prepared data are the wall column).
Study: `flows/study.py --cluster cuda` over a study file's protocol (configs/studies/scale-out.yaml) with
CUDA_VISIBLE_DEVICES set to one GPU, then to N; both start from the same shared stages (copied), so the runs
per hour compare the grid alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "src"), str(REPO)]

from harness.provenance import git_commit  # noqa: E402

STAGES = ("pretrain", "features", "train", "evaluate")
TARGETS = {"pretrain": 1.8, "features": 1.8, "train": 1.7, "evaluate": None, "study": 1.8}


def stage_params(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    if args.quick:
        data = {"source": "digits", "base_classes": 4, "classes_per_task": 2}
        backbone = {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 4,
                    "num_heads": 3}
        batch = 32
    else:
        data = {"source": "fashion_mnist", "root": str(args.data_root), "base_classes": 4, "classes_per_task": 2}
        backbone = {"name": args.model, "img_size": args.img_size, "patch_size": 16}
        batch = args.batch_size
    return {
        "data": data,
        "backbone": {**backbone, "source": "pretrain",
                     "pretrain": {"data": "base_classes", "epochs": args.pretrain_epochs, "batch_size": batch,
                                  "lr": 1e-3, "compile": args.pretrain_compile}},
        "method": {"name": "apt"},
        "head": {"name": "linear"},
        "train": {"epochs": 1, "batch_size": batch, "device": args.device, "nproc": nproc},
        "eval": {"batch_size": batch},
    }


def write_params(root: Path, raw: dict[str, Any]) -> None:
    from promptcil.config import parse_params

    (root / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json"), sort_keys=False))


def run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def stage_record(root: Path, stage: str) -> tuple[int, float]:
    """(images the stage's work passed over, its seconds) from the stage's own record."""
    out = root / "outputs"
    if stage == "pretrain":
        r = json.loads((out / "backbone/backbone.json").read_text())
        return r["train_images"] * len(r["epoch_losses"]), r["seconds"]
    if stage == "features":
        r = json.loads((out / "features/features_log.json").read_text())
        return r["samples"], r["seconds"]
    if stage == "train":
        r = json.loads((out / "train/train_log.json").read_text())
        return sum(t["samples"] * len(t["epoch_losses"]) for t in r["log"]), sum(t["seconds"] for t in r["log"])
    r = json.loads((out / "evaluate/evaluate.json").read_text())
    return sum(r["test_samples_per_rank"]), r["seconds"]


def measured(root: Path, stage: str, wall: float) -> dict[str, Any]:
    """A stage run's row from its record; pretraining's also with its epochs' seconds, the compile cache's outcome
    and the rate after the first epoch (set-up, first kernel calls, compilation): a long pretraining's rate."""
    images, seconds = stage_record(root, stage)
    row = {"images": images, "seconds": seconds, "images_per_s": images / seconds, "wall_s": wall}
    if stage == "pretrain":
        r = json.loads((root / "outputs/backbone/backbone.json").read_text())
        later = r["epoch_seconds"][1:]
        row |= {"epoch_seconds": r["epoch_seconds"], "compile_cache": r["compile_cache"],
                "later_epochs_images_per_s": r["train_images"] * len(later) / sum(later) if later else None}
    return row


def bench_stages(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    root = args.work / "stages"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    python = [sys.executable, "-m"]
    write_params(root, stage_params(args, 1))
    run([*python, "stages.prepare", "--root", str(root), "--no-progress"], env)
    rows = []
    for stage in [s for s in STAGES if s in args.stages]:
        if stage == "train":  # what train reads besides the backbone: one process, once
            write_params(root, stage_params(args, 1))
            for before in ("prototypes", "prompt_init"):
                run([*python, f"stages.{before}", "--root", str(root), "--no-progress"], env)
        row: dict[str, Any] = {"stage": stage}
        for nproc in (1, args.nproc):
            write_params(root, stage_params(args, nproc))
            command = [*python, f"stages.{stage}", "--root", str(root), "--no-progress"]
            if stage == "pretrain" and args.pretrain_compile is True:  # a run that fills the compile cache first
                row[f"n{nproc}_cold_cache"] = measured(root, stage, run(command, env))
            row[f"n{nproc}"] = timed = measured(root, stage, run(command, env))
            epochs = timed.get("epoch_seconds")
            print(f"{stage} on {nproc}: {timed['images']} images in {timed['seconds']:.1f} s "
                  f"({timed['images_per_s']:,.0f}/s), wall {timed['wall_s']:.1f} s"
                  + (f", epochs {[round(e, 1) for e in epochs]}" if epochs else ""), flush=True)
        row["speedup"] = row[f"n{args.nproc}"]["images_per_s"] / row["n1"]["images_per_s"]
        if row["n1"].get("later_epochs_images_per_s"):
            row["later_epochs_speedup"] = (row[f"n{args.nproc}"]["later_epochs_images_per_s"]
                                           / row["n1"]["later_epochs_images_per_s"])
            print(f"pretrain after its first epoch: {row['later_epochs_speedup']:.2f}x", flush=True)
        row["wall_speedup"] = row["n1"]["wall_s"] / row[f"n{args.nproc}"]["wall_s"]
        row["target"] = TARGETS[stage]
        rows.append(row)
    return rows


def bench_study(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The study's grid on a LocalCUDACluster of 1 GPU, then of N from a copy of the same shared stages.
    Runs per hour: runs over the grid's span (first run's start to last run's end, from the runs' records),
    so neither Prefect's nor the cluster's start-up nor the shared stages count."""
    result: dict[str, Any] = {"spec": str(args.study), "protocol": args.protocol, "seeds": args.seeds}
    first = args.work / "study-1"
    base = [sys.executable, "-m", "flows.study", str(args.study), "--protocol", args.protocol, "--seeds",
            *map(str, args.seeds), "--cluster", "cuda", "--data-root", str(args.data_root)]
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    for gpus, folder in ((1, first), (args.nproc, args.work / f"study-{args.nproc}")):
        shutil.rmtree(folder, ignore_errors=True)
        if gpus != 1:
            shutil.copytree(first / args.protocol / "shared", folder / args.protocol / "shared")
        visible = ",".join(str(g) for g in range(gpus))
        wall = run([*base, "--work", str(folder), "--out", str(folder / "results")],
                   env | store | {"CUDA_VISIBLE_DEVICES": visible}, cwd=REPO)
        rows = json.loads(next((folder / "results").glob("*.json")).read_text())["rows"]
        span = max(r["run_window_seconds"][1] for r in rows) - min(r["run_window_seconds"][0] for r in rows)
        result[f"gpus{gpus}"] = {"runs": len(rows), "grid_s": span, "wall_s": wall,
                                 "runs_per_hour": 3600 * len(rows) / span,
                                 "runs_by_start": sorted(  # the schedule: which worker ran what, when
                                     ({"run": f"{r['variant']} seed {r['seed']}", "worker": r.get("worker"),
                                       "window": r["run_window_seconds"], "stages": r.get("stage_seconds")}
                                      for r in rows),
                                     key=lambda r: r["window"][0])}
        print(f"study on {gpus} GPU(s): {len(rows)} runs in {span:.0f} s (wall {wall:.0f} s)", flush=True)
    result["speedup"] = result[f"gpus{args.nproc}"]["runs_per_hour"] / result["gpus1"]["runs_per_hour"]
    result["target"] = TARGETS["study"]
    return result


def table(report: dict[str, Any]) -> str:
    n = report["meta"]["nproc"]
    lines = [f"| stage | images | 1 process: img/s | {n} processes: img/s | speed-up | target | wall 1 → {n} (s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in report["stages"]:
        passed = row["target"] is not None and row["speedup"] >= row["target"]
        verdict = "" if row["target"] is None else f"≥ {row['target']} {'PASS' if passed else 'MISS'}"
        lines.append(f"| {row['stage']} | {row['n1']['images']:,} | {row['n1']['images_per_s']:,.0f} | "
                     f"{row[f'n{n}']['images_per_s']:,.0f} | {row['speedup']:.2f}× | {verdict} | "
                     f"{row['n1']['wall_s']:.1f} → {row[f'n{n}']['wall_s']:.1f} |")
        if row.get("later_epochs_speedup"):
            lines.append(f"| … after its first epoch | | {row['n1']['later_epochs_images_per_s']:,.0f} | "
                         f"{row[f'n{n}']['later_epochs_images_per_s']:,.0f} | {row['later_epochs_speedup']:.2f}× | | |")
    study = report.get("study")
    if study:
        rate = {"1": study["gpus1"]["runs_per_hour"], str(n): study[f"gpus{n}"]["runs_per_hour"]}
        verdict = "PASS" if study["speedup"] >= study["target"] else "MISS"
        lines += ["", f"| study ({study['protocol']}, seeds {study['seeds']}) | runs | runs/hour, 1 GPU | runs/hour, "
                      f"{n} GPUs | speed-up | target |", "|---|---:|---:|---:|---:|---:|",
                  f"| `--cluster cuda` | {study['gpus1']['runs']} | {rate['1']:,.0f} | {rate[str(n)]:,.0f} | "
                  f"{study['speedup']:.2f}× | ≥ {study['target']} {verdict} |"]
    meta = report["meta"]
    lines += ["", f"{meta['device']} × {n}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}; "
                  f"{meta['model']} at {meta['img_size']} px, batch {meta['batch_size']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--data-root", type=Path, help="Fashion-MNIST's gz files (default: Debian's package)")
    p.add_argument("--nproc", type=int, default=2, help="processes / GPUs to compare with one (default %(default)s)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT, random init (default %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (default %(default)s)")
    p.add_argument("--pretrain-epochs", type=int,
                   help="pretraining epochs on the base classes (default 12, --quick 3): enough that the first "
                        "epoch's warm-up (kernel choice, allocator, NCCL buckets: paid once a process, on one GPU as "
                        "on N) is a small part of the stage, as in a pretraining of hours")
    p.add_argument("--pretrain-compile", type=lambda text: {"true": True, "false": False}.get(text, text),
                   default="auto", choices=["auto", True, False],
                   help="backbone.pretrain.compile: auto (default), true (each N runs once to fill the compile "
                        "cache, then the timed run), false")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default %(default)s)")
    p.add_argument("--study", type=Path, default=REPO / "configs/studies/scale-out.yaml",
                   help="(default: configs/studies/scale-out.yaml)")
    p.add_argument("--protocol", default="fashion-mnist-b4inc2", help="the study's protocol (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the study's seeds (default 0 1)")
    p.add_argument("--stages", type=lambda text: text.split(","), default=list(STAGES),
                   help="comma-separated stages to time (default: %(default)s); '' for none")
    p.add_argument("--skip-study", action="store_true", help="only the torchrun stages")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: gloo, a tiny ViT on digits, no study")
    p.add_argument("--work", type=Path, default=Path("/tmp/promptcil-scale-out"), help="(default %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON folder (default %(default)s)")
    args = p.parse_args(argv)
    args.data_root = (args.data_root or Path("/usr/share/datasets/fashion-mnist")).resolve()
    args.work = args.work.resolve()  # the stages and the study run with other working folders: absolute paths
    if args.quick:
        args.device, args.skip_study = "cpu", True
    args.pretrain_epochs = args.pretrain_epochs or (3 if args.quick else 12)
    import torch

    from promptcil.runtime import resolve_device

    device = resolve_device(args.device)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    report: dict[str, Any] = {"meta": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "nproc": args.nproc,
        "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        "model": "vit_tiny (4 blocks, 48 wide)" if args.quick else args.model,
        "img_size": 16 if args.quick else args.img_size, "batch_size": 32 if args.quick else args.batch_size,
        "pretrain_compile": args.pretrain_compile}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-out-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report["stages"] = bench_stages(args, env) if [s for s in args.stages if s] else []
    path.write_text(json.dumps(report, indent=2))  # what is measured survives a later part's failure
    if not args.skip_study:
        report["study"] = bench_study(args, env)
        path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
