"""Data at scale (issue 20): a synthetic ImageFolder of JPEGs made on the machine, prepared into shards and run
through the whole pipeline as one Prefect flow, at two sizes; each stage's rate against the harness's rates
measured in the same run, peak host memory and disk per stage; then train.compile cold and warm.

    python bench/data_scale.py --out DIR                       # the device run: 50 000 and 200 000 JPEGs, ViT-B/16
    python bench/data_scale.py --quick --out DIR               # CPU smoke test: 600 and 1 200 images, a tiny ViT
    python bench/data_scale.py --parts compile --out DIR       # only train.compile, cold then warm cache
    python bench/data_scale.py --parts decode --sizes 50000 --out DIR   # features: decode cpu, CPU shares of nvjpeg
    python bench/data_scale.py --parts loader --sizes 50000 --out DIR   # the loader alone, by decoder and threads

Images: Fashion-MNIST (Debian's package, or --fm-root) upscaled to --size px, each with its own Gaussian noise
and brightness, saved as JPEG (quality 90) in train/<class>/ and test/<class>/; the smaller size is hard links
to the first images of each class of the larger. The pipeline: params.yaml with data.shards (imagefolder),
a ViT with random weights read from a local file (`backbone.source: file`, as a team with its own checkpoint
runs it; the weights are made once, before the flow), APT + the aligned linear head, 4 + 3 × 2 classes, one
epoch per task, augmentation on.

Figures (docs/performance.md, "Data at scale"):
- features: the stage's images / its seconds ÷ the plain forward rate of the harness (target ≥ 0.9).
- train: its GPU-bound time (step images ÷ the fwd+bwd limit rate, plus the heads' forward passes ÷ the plain
  rate) ÷ its seconds, with decode and augmentation in the seconds (target ≥ 0.9).
- pipeline: the flow's stages after prepare (pretrain … evaluate) against their GPU-bound time (target ≥ 0.85);
  prepare (packing and checking every JPEG once per data version, on the CPU) is reported beside it.
- host memory: peak PSS (resident, shared pages split) of the flow's process tree while each stage ran, sampled
  every 0.2 s; disk: the
  stage's outputs folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "src"), str(REPO)]

from harness.provenance import git_commit  # noqa: E402

STAGES = ("prepare", "pretrain", "features", "prototypes", "prompt_init", "train", "evaluate", "register")
RECORDS = {"prepare": "prepare/tasks.json", "pretrain": "backbone/backbone.json",
           "features": "features/features_log.json", "prototypes": "prototypes/prototypes.json",
           "prompt_init": "prompt_init/method.json", "train": "train/train_log.json",
           "evaluate": "evaluate/evaluate.json", "register": "register/registration.json"}


# ---------------------------------------------------------------- the images


def fashion_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def _write_images(job: tuple[Path, np.ndarray, np.ndarray, int, int]) -> None:
    from PIL import Image

    folder, images, labels, first, size = job
    for k, (image, label) in enumerate(zip(images, labels)):
        n = first + k
        rng = np.random.default_rng(n)
        up = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), np.float32)
        tint = rng.uniform(0.6, 1.0, 3).astype(np.float32)
        rgb = up[..., None] * tint + rng.normal(0, 8, (size, size, 3)).astype(np.float32)
        target = folder / f"class-{label}" / f"{n:07d}.jpg"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(target, quality=90)


def make_tree(root: Path, fm: Path, train: int, test: int, size: int) -> dict[str, Any]:
    """root/{train,test}/class-<k>/<n>.jpg: `train` images drawn cyclically from Fashion-MNIST's train split."""
    started = time.perf_counter()
    jobs = []
    for split, count in (("train", train), ("test", test)):
        images, labels = fashion_mnist(fm, split)
        picks = np.arange(count) % len(images)
        for k in range(10):
            (root / split / f"class-{k}").mkdir(parents=True, exist_ok=True)
        for first in range(0, count, 1000):
            rows = picks[first:first + 1000]
            jobs.append((root / split, images[rows], labels[rows], first, size))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_images, jobs))
    return {"seconds": time.perf_counter() - started, "bytes": du(root)}


def linked_subset(big: Path, small: Path, train: int) -> None:
    """The first train/10 images of each class of `big` as hard links (test/ linked whole)."""
    for split in ("train", "test"):
        for folder in sorted((big / split).iterdir()):
            files = sorted(folder.iterdir())
            keep = files[:train // 10] if split == "train" else files
            (small / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in keep:
                os.link(file, small / split / folder.name / file.name)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- the harness's rates


def harness_rates(args: argparse.Namespace) -> dict[str, float]:
    """The plain forward and the fwd+bwd limit (bench/harness), in img/s, on this run's model and device."""
    import torch

    from promptcil.prompts import create_method

    from harness.inputs import Batches, Run
    from harness.models import InputPrompt, build_model, method_config
    from harness.steps import inference_rate, train_rate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(device=device, batch_size=args.batch_size, backbone_overrides=backbone_overrides(args), steps=30,
              repeats=3, warmup=5)
    backbone = run.backbone(args.model)
    batches = Batches.random(run, 3, tuple(backbone.patch_embed.img_size))
    plain = build_model(run, backbone, create_method(method_config("none"), backbone))
    rates = {"plain_forward": inference_rate(run, plain, batches)["img_per_s"]}
    scratch = Path(args.work) / "harness"
    scratch.mkdir(parents=True, exist_ok=True)
    rates["fwd_bwd_limit"] = train_rate(run, build_model(run, backbone, InputPrompt(backbone)), batches,
                                        scratch)["img_per_s"]
    del plain, batches, backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rates


# ---------------------------------------------------------------- one pipeline


def backbone_overrides(args: argparse.Namespace) -> dict[str, int]:
    if args.quick:
        return {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    return {"img_size": args.size, "patch_size": 16}


def random_weights(args: argparse.Namespace) -> Path:
    """The backbone's random weights (seed 0) as a local safetensors file, made once per --work folder: the
    stages load it as they would a team's checkpoint, instead of each drawing the random init again."""
    import safetensors.torch
    import torch

    from promptcil.backbone import create_vit
    from promptcil.config.sections import BackboneConfig

    path = args.work / f"random-{args.model}-{'quick' if args.quick else args.size}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = create_vit(BackboneConfig(name=args.model, **backbone_overrides(args)))
        safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def write_params(workspace: Path, root: Path, args: argparse.Namespace, **train: Any) -> None:
    from promptcil.config import parse_params

    raw = {
        "data": {"source": "imagefolder", "root": str(root), "shards": True, "decode": args.decode,
                 "base_classes": 4, "classes_per_task": 2},
        "backbone": {"name": args.model, "source": "file", "file": str(random_weights(args)),
                     **backbone_overrides(args)},
        "method": {"name": "apt"}, "head": {"name": "linear"},
        "train": {"epochs": 1, "batch_size": args.batch_size, "compile": False,
                  "augment": {"crop_scale": [0.5, 1.0], "flip": True}, **train},
        "eval": {"batch_size": args.batch_size},
        "registry": {"gate": {"min_A_last": None, "max_forgetting": None, "min_newest_task_accuracy": None,
                              "min_base_accuracy": None}},
    }
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).model_dump(mode="json"), sort_keys=False))


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (prepare's checking processes, torchrun ranks), from /proc:
    each process's proportional share (Pss), so pages a forked child shares with its parent count once."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def run_flow(workspace: Path, env: dict[str, str]) -> dict[str, Any]:
    """`python -m flows.pipeline --root workspace`, its process tree's RSS sampled every 0.2 s; the stages'
    windows from their records' write times (each stage writes its record last)."""
    started = time.time()
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--root", str(workspace)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    while flow.poll() is None:
        samples.append((time.time(), tree_rss(flow.pid)))
        time.sleep(0.2)
    log = flow.stdout.read() if flow.stdout else ""
    ended = time.time()
    out = workspace / "outputs"
    done = [stage for stage in STAGES if (out / RECORDS[stage]).exists()]
    if flow.returncode != 0 and "evaluate" not in done:
        raise RuntimeError(f"pipeline failed ({flow.returncode}):\n{log[-3000:]}")
    ends = {stage: (out / RECORDS[stage]).stat().st_mtime for stage in done}
    stages: dict[str, Any] = {"startup": {"window_s": flow_began(log, started) - started}}
    begin = started + stages["startup"]["window_s"]  # interpreter, imports, Prefect's temporary server
    for stage in done:
        window = [s for t, s in samples if begin <= t <= ends[stage]]
        stages[stage] = {"window_s": ends[stage] - begin, "peak_rss_bytes": max(window, default=0),
                         "disk_bytes": du(out / Path(RECORDS[stage]).parent)}
        begin = ends[stage]
    failed = {"error": log[-3000:]} if flow.returncode != 0 else {}  # register (MLflow) failed: the rest counts
    return {"wall_s": ended - started, "stages": stages, "log_tail": log[-1500:], **failed}


def flow_began(log: str, started: float) -> float:
    """When Prefect began the flow run (its log line's clock time, on the day the run started)."""
    line = next((line for line in log.splitlines() if "Beginning flow run" in line), None)
    if line is None:
        return started
    clock = time.strptime(time.strftime("%Y-%m-%d ", time.localtime(started)) + line[:8], "%Y-%m-%d %H:%M:%S")
    return time.mktime(clock) + float("0" + line[8:12])


def figures(workspace: Path, flow: dict[str, Any], rates: dict[str, float]) -> dict[str, Any]:
    """Each stage's rate and its GPU-bound time from the stages' own records."""
    out = workspace / "outputs"
    read = lambda rel: json.loads((out / rel).read_text())  # noqa: E731
    features, train, evaluate = read(RECORDS["features"]), read(RECORDS["train"]), read(RECORDS["evaluate"])
    step_images = sum(t["samples"] * len(t["epoch_losses"]) for t in train["log"])
    train_s = sum(t["seconds"] for t in train["log"])
    bound = {"features": features["samples"] / rates["plain_forward"],
             "train": step_images / rates["fwd_bwd_limit"]
             + (train["images_forwarded"] - step_images) / rates["plain_forward"],
             "evaluate": evaluate["images_forwarded"] / rates["plain_forward"]}
    after_prepare = sum(flow["stages"][s]["window_s"] for s in STAGES[1:STAGES.index("evaluate") + 1])
    return {
        "train_images": features["samples"],
        "features": {"img_per_s": features["samples"] / features["seconds"], "seconds": features["seconds"],
                     "vs_plain_forward": features["samples"] / features["seconds"] / rates["plain_forward"]},
        "train": {"step_images": step_images, "images_forwarded": train["images_forwarded"], "seconds": train_s,
                  "end_seconds": sum(t.get("end_seconds", 0.0) for t in train["log"]),
                  "gpu_bound_s": bound["train"], "vs_gpu_bound": bound["train"] / train_s,
                  "compiled": train.get("compiled")},
        "evaluate": {"images_forwarded": evaluate["images_forwarded"], "seconds": evaluate["seconds"],
                     "phase_seconds": evaluate.get("phase_seconds"),
                     "vs_gpu_bound": bound["evaluate"] / evaluate["seconds"]},
        "pipeline": {"seconds_after_prepare": after_prepare, "gpu_bound_s": sum(bound.values()),
                     "vs_gpu_bound": sum(bound.values()) / after_prepare,
                     "prepare_s": flow["stages"]["prepare"]["window_s"]},
    }


DECODE_VARIANTS = ({"decode": "cpu"}, {"decode_cpu_share": 0.2}, {"decode_cpu_share": 0.35}, {"decode_cpu_share": 0.5})


def features_with(workspace: Path, env: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    """The features stage again with `data` overriding the flow's data params: decode cpu (the loader's threads
    decode), or a share of the JPEGs decoded on the CPU beside nvjpeg (data.decode_cpu_share)."""
    original = (workspace / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["data"].update(data)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        subprocess.run([sys.executable, "-m", "stages.features", "--root", str(workspace), "--no-progress"],
                       cwd=REPO, env=env, check=True, capture_output=True)
    finally:  # the parts after this compare with the flow's own run: its data params
        (workspace / "params.yaml").write_text(original)
    record = json.loads((workspace / "outputs" / RECORDS["features"]).read_text())
    return {"data": data, "img_per_s": record["samples"] / record["seconds"], "seconds": record["seconds"]}


LOADER_VARIANTS = (("cpu", 8, 0.0), ("auto", 4, 0.0), ("auto", 8, 0.0), ("cpu", 15, 0.0), ("auto", 8, 0.35),
                   ("auto", 16, 0.0))


def loader_rates(workspace: Path, batch_size: int) -> dict[str, Any]:
    """Where the features pass's ceiling is: the sharded loader alone (no model; images/s onto the GPU) by decoder,
    threads and CPU share, then the features pass in this process with Python's default thread switch interval
    and with a 1 ms one (the loader's threads and the model's thread share one interpreter); data.decode auto."""
    import torch

    from promptcil.backbone import load_backbone
    from promptcil.config import BackboneConfig
    from promptcil.data import device_batches
    from promptcil.data.shards import read_shards
    from promptcil.features import class_statistics

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train = read_shards(workspace / "outputs" / "prepare", "train")
    result: dict[str, Any] = {"loader_alone": []}
    for decode, threads, share in LOADER_VARIANTS:
        data = train.with_loading(decode, threads, share)
        sync()
        started = time.perf_counter()
        for _ in device_batches(data, batch_size, device):
            pass
        sync()
        rate = len(data) / (time.perf_counter() - started)
        result["loader_alone"].append({"decode": decode, "threads": threads, "cpu_share": share, "img_per_s": rate})
        print(f"loader alone, decode {decode}, {threads} threads, CPU share {share}: {rate:,.0f} img/s", flush=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    backbone = load_backbone(BackboneConfig(**params["backbone"])).to(device)
    data = train.with_loading("auto", None, 0.0)
    default_interval = sys.getswitchinterval()
    result["features_in_process"] = []
    for interval in (default_interval, 0.001):
        sys.setswitchinterval(interval)
        sync()
        started = time.perf_counter()
        class_statistics(backbone, data, batch_size, device, num_classes=int(train.labels.max()) + 1,
                         affinity_classes=range(4))
        sync()
        rate = len(data) / (time.perf_counter() - started)
        result["features_in_process"].append({"switch_interval_s": interval, "img_per_s": rate})
        print(f"features in process, switch interval {interval * 1000:g} ms: {rate:,.0f} img/s", flush=True)
    sys.setswitchinterval(default_interval)
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def compile_runs(workspace: Path, env: dict[str, str]) -> dict[str, Any]:
    """The train stage with train.compile: true twice against a fresh compile cache (cold, then warm), beside
    the eager run of the flow: each run's first task (compilation) and the tasks after it."""
    cache = workspace.parent / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    kept = workspace / "outputs" / "train-eager.json"  # the flow's eager record, kept for a rerun of this part
    if not kept.exists():
        shutil.copyfile(workspace / "outputs" / RECORDS["train"], kept)
    eager = json.loads(kept.read_text())
    runs: dict[str, Any] = {"eager": [t["seconds"] for t in eager["log"]]}
    params["train"]["compile"] = True
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for label in ("cold", "warm"):
        shutil.rmtree(workspace / "outputs" / "train", ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.train", "--root", str(workspace), "--no-progress"], cwd=REPO,
                       env=env | {"TORCHINDUCTOR_CACHE_DIR": str(cache)}, check=True, capture_output=True)
        record = json.loads((workspace / "outputs" / RECORDS["train"]).read_text())
        runs[label] = {"task_seconds": [t["seconds"] for t in record["log"]], "wall_s": time.perf_counter() - started,
                       "compiled": record.get("compiled")}
    later = lambda seconds: sum(seconds[1:])  # noqa: E731
    runs["later_tasks_speedup"] = later(runs["eager"]) / later(runs["warm"]["task_seconds"])
    runs["first_task_s"] = {"eager": runs["eager"][0], "cold": runs["cold"]["task_seconds"][0],
                            "warm": runs["warm"]["task_seconds"][0]}
    return runs


# ---------------------------------------------------------------- report


def table(report: dict[str, Any]) -> str:
    lines = ["| train images | features ÷ plain fwd | train ÷ GPU-bound | evaluate ÷ GPU-bound | pipeline ÷ GPU-bound "
             "(after prepare) | prepare (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for size in report.get("sizes", []):
        f = size["figures"]
        lines.append(f"| {f['train_images']:,} | {f['features']['vs_plain_forward']:.3f} "
                     f"({f['features']['img_per_s']:,.0f} img/s) | {f['train']['vs_gpu_bound']:.3f} | "
                     f"{f['evaluate']['vs_gpu_bound']:.3f} | {f['pipeline']['vs_gpu_bound']:.3f} "
                     f"({f['pipeline']['seconds_after_prepare']:.0f} s vs {f['pipeline']['gpu_bound_s']:.0f} s) | "
                     f"{f['pipeline']['prepare_s']:.0f} |")
    lines += ["", "| train images | stage | window (s) | peak host memory (GiB) | disk (MiB) |",
              "|---:|---|---:|---:|---:|"]
    for size in report.get("sizes", []):
        for stage, s in size["flow"]["stages"].items():
            if stage != "startup":
                memory = f"{s['peak_rss_bytes'] / 2**30:.2f}" if s["peak_rss_bytes"] else "– (under one sample)"
                lines.append(f"| {size['figures']['train_images']:,} | {stage} | {s['window_s']:.1f} | {memory} | "
                             f"{s['disk_bytes'] / 2**20:,.0f} |")
    rates = report.get("rates")
    if rates:
        lines += ["", f"harness: plain forward {rates['plain_forward']:,.0f} img/s, fwd+bwd limit "
                      f"{rates['fwd_bwd_limit']:,.0f} img/s"]
    meta = report["meta"]
    lines += [f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}; {meta['model']} at "
              f"{meta['size']} px, batch {meta['batch_size']}, decode {meta['decode']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000], help="train images (default 50k 200k)")
    p.add_argument("--test", type=int, default=10_000, help="test images (default %(default)s)")
    p.add_argument("--size", type=int, default=224, help="image and model size in px (default %(default)s)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT, random init (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    p.add_argument("--decode", default="auto", help="data.decode for the flows (default %(default)s)")
    p.add_argument("--parts", default="flows,decode,compile", help="comma-separated: flows, decode, loader, compile")
    p.add_argument("--fm-root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="Fashion-MNIST's gz files (default: Debian's package)")
    p.add_argument("--work", type=Path, default=Path("/tmp/promptcil-data-scale"), help="(default %(default)s)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: 600 and 1200 images, a tiny ViT")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="JSON folder (default %(default)s)")
    args = p.parse_args(argv)
    args.work, args.fm_root = args.work.resolve(), args.fm_root.resolve()  # written into params.yaml files: absolute
    if args.quick:
        args.sizes, args.test, args.size, args.model, args.batch_size = [600, 1200], 200, 32, "vit_tiny_patch16_224", 64
        args.parts = args.parts.replace(",compile", "")  # inductor's C++ build on a CPU: minutes (ask for it)
    parts = set(args.parts.split(","))
    import torch

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    report: dict[str, Any] = {"meta": {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU", "torch": torch.__version__,
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "model": args.model, "size": args.size,
        "batch_size": args.batch_size, "decode": args.decode, "cpus": os.cpu_count()}, "sizes": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"data-scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    save = lambda: path.write_text(json.dumps(report, indent=2))  # noqa: E731  (what is measured survives a failure)
    args.work.mkdir(parents=True, exist_ok=True)
    biggest = args.work / f"images-{max(args.sizes)}"
    if not (biggest / "test").is_dir():
        shutil.rmtree(biggest, ignore_errors=True)
        report["images"] = make_tree(biggest, args.fm_root, max(args.sizes), args.test, args.size)
        print(f"made {max(args.sizes):,} + {args.test:,} JPEGs in {report['images']['seconds']:.0f} s "
              f"({report['images']['bytes'] / 2**30:.2f} GiB)", flush=True)
    report["rates"] = harness_rates(args)
    print(f"harness: plain {report['rates']['plain_forward']:,.0f} img/s, limit "
          f"{report['rates']['fwd_bwd_limit']:,.0f} img/s", flush=True)
    save()
    smallest = args.work / f"ws-{min(args.sizes)}"
    for size in sorted(args.sizes) if "flows" in parts else []:
        root = biggest if size == max(args.sizes) else args.work / f"images-{size}"
        if not root.is_dir():
            linked_subset(biggest, root, size)
        workspace = args.work / f"ws-{size}"
        shutil.rmtree(workspace, ignore_errors=True)
        write_params(workspace, root, args)
        flow = run_flow(workspace, env)  # a failure stops the bench: a rerun with other settings would hide it
        entry = {"train_images": size, "flow": flow, "figures": figures(workspace, flow, report["rates"])}
        report["sizes"].append(entry)
        print(json.dumps(entry["figures"]), flush=True)
        save()
    if not (smallest / "outputs" / RECORDS["train"]).exists():
        raise SystemExit(f"--parts decode/compile use the flow's workspace {smallest}: run with flows first")
    if "decode" in parts:
        report["decode_features"] = []
        for data in DECODE_VARIANTS:
            report["decode_features"].append(features_with(smallest, env, data))
            print(f"features with {data}: {report['decode_features'][-1]['img_per_s']:,.0f} img/s", flush=True)
            save()
    if "loader" in parts:
        report["loader"] = loader_rates(smallest, args.batch_size)
        save()
    if "compile" in parts:
        report["compile"] = compile_runs(smallest, env)
        print(json.dumps(report["compile"]), flush=True)
        save()
    print(table(report))
    print(f"\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
