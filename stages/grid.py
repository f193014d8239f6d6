"""Run the pipeline's stage functions over a grid of params, one folder per run.

A study is a grid of variants (params overrides) x protocols (a params file + presets) x
seeds. Per protocol the stages that do not depend on the variant (prepare, pretrain,
features, prototypes) run once, with the protocol's params and seed 0, in a shared
folder: the backbone is the same for every variant and seed, so differences between
rows are the method's, not the backbone's (DVC's run cache gives `dvc exp run` the same
sharing). Per run, prompt_init, train and evaluate run in their own folder whose
outputs/ links to the shared stages' outputs: exactly the files `dvc repro` would
produce. Every folder records its producer (`promptcil.provenance`: the params and the
sha256 of the shared outputs it read): a finished run keeps its result.json and is not run
again, so an interrupted study continues where it stopped; a folder written with other
params or from other shared outputs (an edited study file or preset) starts clean. Code
changes are not tracked: use a new --work then.

Used by the Prefect study flow (flows/study.py: MLflow runs, parallel workers) and by
bench/study.py (the same grid, in-process, for machines without MLflow and Prefect).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptcil.artifacts import load_tensors, read_json, write_json
from promptcil.config import ConfigError, deep_merge, flatten, merged_params, parse_params
from promptcil.provenance import artifact_sha256, claim, file_sha256, producer_record

REPO = Path(__file__).resolve().parents[1]
SHARED_STAGES = ("prepare", "backbone", "features", "prototypes")  # their output folders, linked into every run
SHARED_DVC_STAGES = ("prepare", "pretrain", "features", "prototypes")  # the same stages, as dvc.yaml names them
# A protocol is a params file and the presets laid over it (paths relative to the repository).
PROTOCOLS: dict[str, list[str]] = {
    "digits": ["params.yaml"],  # the default params: digits B4 + 3 tasks of 2, a tiny ViT (CPU)
    "fashion-mnist-b4inc2": ["params.yaml", "configs/fashion-mnist-b4inc2.yaml"],
    "cross-fmnist-digits": ["params.yaml", "configs/cross-fmnist-digits.yaml"],
}


@dataclass(frozen=True)
class Variant:
    """One row of a study: a name and the params it changes."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Stages read and write outputs/ relative to the working directory, as under `dvc repro`."""
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def set_cpu_threads(threads: int) -> None:
    """A worker process's share of the CPU threads, when several runs share the machine."""
    torch.set_num_threads(threads)


def protocol_params(files: list[str | Path], data_root: Path | None = None) -> dict[str, Any]:
    """A protocol's params: the first file with the others laid over it, relative paths from the
    repository. `data_root` (a folder holding Fashion-MNIST, say) sets data.root and backbone.pretrain.root."""
    paths = [Path(f) if Path(f).is_absolute() else REPO / f for f in files]
    raw = merged_params(*paths)
    if data_root is None:
        return raw
    root = str(Path(data_root).resolve())
    return deep_merge(raw, {"data": {"root": root}, "backbone": {"pretrain": {"root": root}}})


def write_params(folder: Path, raw: dict[str, Any]) -> None:
    import yaml

    parse_params(raw, str(folder / "params.yaml"))  # a bad override fails before any work
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def prepare_protocol(
    folder: Path, raw: dict[str, Any], progress: bool, backbone_cache: Path | None = None
) -> dict[str, Any]:
    """The variant-independent stages, once per protocol; returns pretraining facts. With `backbone_cache`
    (a folder named by what the pretraining depends on), a backbone found there is copied instead of
    pretrained again, and a new one is kept there."""
    from stages.features import features
    from stages.prepare import prepare
    from stages.pretrain import pretrain
    from stages.prototypes import prototypes

    params = deep_merge(raw, {"train": {"seed": 0}})
    ours = claim(folder, producer_record(params, {}))  # other params' shared outputs are removed first
    done = folder / "outputs" / "prototypes" / "prototypes.safetensors"
    with working_directory(folder):
        if not (ours and done.exists()):
            write_params(folder, params)
            prepare()
            if backbone_cache is not None and (backbone_cache / "backbone.json").exists():
                shutil.copytree(backbone_cache, "outputs/backbone", dirs_exist_ok=True)
            else:
                pretrain(progress=progress)
                if backbone_cache is not None:
                    shutil.copytree("outputs/backbone", backbone_cache, dirs_exist_ok=True)
            features()
            prototypes()
        return read_json(Path("outputs/backbone/backbone.json"))


def shared_inputs(shared: Path) -> dict[str, str]:
    """The sha256 of what a run reads from its protocol's shared outputs."""
    outputs = shared / "outputs"
    return {"tasks": file_sha256(outputs / "prepare" / "tasks.json"),
            "train_images": artifact_sha256(outputs / "prepare" / "train.safetensors"),
            "backbone": read_json(outputs / "backbone" / "backbone.json")["weights_sha256"],
            "features": artifact_sha256(outputs / "features" / "features.safetensors"),
            "prototypes": artifact_sha256(outputs / "prototypes" / "prototypes.safetensors")}


def head_bytes(task_state: Path) -> int:
    """What the head keeps between tasks (for the ridge head: its float64 running sums)."""
    tensors, _ = load_tensors(task_state, kind="task_state")
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("head."))


def first_epoch_accuracy(state: dict[str, torch.Tensor]) -> float:
    """Task 0's test accuracy of the model state committed after task 0's first epoch (in a run folder)."""
    from promptcil.data import subset
    from promptcil.evaluation import predict

    from stages.common import device_for, image_set, params, task_split
    from stages.train import build_model

    p = params()
    model = build_model(p, init=False)
    model.load_trainable_state(state)
    test = subset(image_set("test"), list(task_split().task_classes(0)))
    return float((predict(model, test, p.eval.batch_size, device_for(p)) == test.labels).float().mean())


def run_variant(
    run_dir: Path, shared: Path, raw: dict[str, Any], progress: bool, probe_first_epoch: bool = False
) -> dict[str, Any]:
    """prompt_init, train and evaluate in `run_dir`; with `probe_first_epoch` (trained heads only) also
    task 0's test accuracy after its first epoch."""
    from stages.evaluate import evaluate
    from stages.prompt_init import prompt_init
    from stages.train import train

    result_file = run_dir / "result.json"
    if claim(run_dir, producer_record(raw, shared_inputs(shared))) and result_file.exists():
        return read_json(result_file)
    write_params(run_dir, raw)
    outputs = run_dir / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        link = outputs / stage
        if not link.exists():
            link.symlink_to(shared / "outputs" / stage, target_is_directory=True)
    with working_directory(run_dir):
        started = time.perf_counter()
        prompt_init()
        after_first_epoch: dict[str, torch.Tensor] = {}

        def keep_first_epoch(task: int, epoch: int) -> None:
            if probe_first_epoch and (task, epoch) == (0, 0):
                checkpoint = next(Path("outputs/train/checkpoints").glob("ckpt-*.safetensors"))
                tensors, _ = load_tensors(checkpoint, kind="checkpoint")
                after_first_epoch.update({k.removeprefix("model."): v for k, v in tensors.items()
                                          if k.startswith("model.")})

        log = train(progress=progress, on_epoch_end=keep_first_epoch)
        metrics = evaluate()
        seconds = time.perf_counter() - started
        last_state = sorted(Path("outputs/train").glob("task_*.safetensors"))[-1]
        result = {
            "A_last": metrics["A_last"],
            "A_avg": metrics["A_avg"],
            "forgetting": metrics["forgetting"],
            "accuracy_matrix": metrics["accuracy_matrix"],
            "accuracy_after_task": metrics["accuracy_after_task"],
            # the last row of the matrix: the newest task, the base classes and the worst task after the last
            "newest_task_last": metrics["accuracy_matrix"][-1][-1],
            "base_last": metrics["accuracy_matrix"][-1][0],
            "worst_task_last": min(metrics["accuracy_matrix"][-1]),
            **{key: metrics.get(key) for key in (
                "newest_task_accuracy_after_task", "A_joint", "A_last_vs_joint", "base_avg", "next_task_class_mean_avg",
                "HM_avg", "base_after_task", "next_task_class_mean_after_task", "HM_after_task")},
            "gflops_per_image": metrics["gflops_per_image"],
            "trainable_params": metrics["trainable_params"],
            "prompt_params": metrics["prompt_params"],
            "head_bytes": head_bytes(last_state),
            "seconds_per_task": [t["seconds"] for t in log["log"]],
            "run_seconds": seconds,
            "first_epoch_accuracy": first_epoch_accuracy(after_first_epoch) if after_first_epoch else None,
        }
    write_json(result_file, result)
    return result


@dataclass(frozen=True)
class Point:
    """One run of a study: where it runs and with which params."""

    protocol: str
    variant: str
    seed: int
    run_dir: Path
    params: dict[str, Any]


def shared_params(dvc_file: Path = REPO / "dvc.yaml") -> tuple[str, ...]:
    """The params the shared stages read, as dvc.yaml declares them (one source for DVC and the grid),
    less train.seed: the grid runs the shared stages with seed 0 and the study's seeds per run."""
    import yaml

    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    return tuple(key for stage in SHARED_DVC_STAGES for key in stages[stage].get("params", []) if key != "train.seed")


def shared_keys(overrides: dict[str, Any]) -> list[str]:
    """The dotted keys (leaves) of `overrides` that the shared stages read: a variant may not change
    them, since its runs reuse the protocol's shared outputs."""
    read = shared_params()
    return [key for key in flatten(overrides) if any(key == s or key.startswith(s + ".") for s in read)]


def points(name: str, variants: list[Variant], protocol: str, base: dict[str, Any], seeds: list[int],
           work: Path) -> list[Point]:
    """The runs of one protocol, in <work>/<protocol>/<study>/<variant>/seed<N>; every run's params are
    checked here, so a bad override fails before any work."""
    runs = []
    for variant in variants:
        shared = shared_keys(variant.overrides)
        if shared:
            raise ConfigError(f"variant '{variant.name}' changes {', '.join(shared)}, which the shared stages "
                              f"({', '.join(SHARED_DVC_STAGES)}) use: make it a protocol of its own instead")
        for seed in seeds:
            raw = deep_merge(deep_merge(base, variant.overrides), {"train": {"seed": seed}})
            parse_params(raw, f"{variant.name}, seed {seed}")
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", variant.name)
            runs.append(Point(protocol, variant.name, seed, (work / protocol / name / slug / f"seed{seed}").resolve(),
                              raw))
    return runs


def study_meta(name: str, seeds: list[int]) -> dict[str, Any]:
    return {"study": name, "device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "seeds": seeds, "pretraining": {}}


def pretraining_facts(backbone: dict[str, Any]) -> dict[str, Any]:
    """What the table's footnote says about a protocol's backbone (from outputs/backbone/backbone.json)."""
    return {"data": backbone.get("data", backbone.get("source")), "images": backbone.get("train_images"),
            "seconds": backbone.get("seconds")}


def row(point: Point, result: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": point.protocol, "variant": point.variant, "seed": point.seed, **result}


def progress_line(done: int, total: int, point: Point, result: dict[str, Any]) -> str:
    return (f"[{done}/{total}] {point.protocol} {point.variant} seed {point.seed}: "
            f"A_last {result['A_last']:.3f} A_avg {result['A_avg']:.3f}")


def run_study(
    name: str,
    variants: list[Variant],
    protocols: dict[str, dict[str, Any]],
    seeds: list[int],
    work: Path,
    progress: bool = False,
    probe_first_epoch: bool = False,
    out: Path | None = None,
    columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every (protocol, variant, seed) in this process; `protocols` maps a protocol's name to its
    params. Returns {"rows": per-run results, "meta": ...}. With `out`, the JSON and table are
    rewritten after every run, so a study stopped by a time limit still leaves what it finished."""
    rows: list[dict[str, Any]] = []
    meta = study_meta(name, seeds)
    grid = {protocol: points(name, variants, protocol, base, seeds, work) for protocol, base in protocols.items()}
    total = sum(len(runs) for runs in grid.values())
    for protocol, runs in grid.items():
        shared = (work / protocol / "shared").resolve()
        meta["pretraining"][protocol] = pretraining_facts(prepare_protocol(shared, protocols[protocol], progress))
        for point in runs:
            result = run_variant(point.run_dir, shared, point.params, progress, probe_first_epoch)
            rows.append(row(point, result))
            print(progress_line(len(rows), total, point, result), flush=True)
            if out is not None:
                save({"meta": meta, "rows": rows}, out, columns)
    return {"meta": meta, "rows": rows}


def mean_std(values: list[float]) -> str:
    if len(set(values)) == 1 and float(values[0]).is_integer():  # a count (parameters), the same in every run
        return f"{int(values[0]):,}"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_table(study: dict[str, Any], columns: dict[str, str] | None = None) -> str:
    """Markdown: one line per (protocol, variant), mean ± std over seeds."""
    columns = columns or {}
    header = ["protocol", "variant", "A_last", "A_avg", "forgetting", "GFLOPs/img", "trainable params",
              "head memory", "s/task", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in study["rows"]:
        groups.setdefault((row["protocol"], row["variant"]), []).append(row)
    for (protocol, variant), rows in groups.items():
        forgetting = [r["forgetting"] for r in rows if r["forgetting"] is not None]
        cells = [
            protocol, variant,
            mean_std([r["A_last"] for r in rows]),
            mean_std([r["A_avg"] for r in rows]),
            mean_std(forgetting) if forgetting else "–",
            f"{rows[0]['gflops_per_image']:.4f}",
            f"{rows[0]['trainable_params']:,}",
            _bytes(rows[0]["head_bytes"]),
            f"{statistics.mean(s for r in rows for s in r['seconds_per_task']):.2f}",
            *(mean_std([r[key] for r in rows]) for key in columns.values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    meta = study["meta"]
    pre = "; ".join(f"{k}: {v['images']} images, {v['seconds'] or 0:.0f} s" for k, v in meta["pretraining"].items())
    lines.append("")
    lines.append(f"{meta['device']}, torch {meta['torch']}, {meta['date']}, seeds {meta['seeds']}; "
                 f"backbone pretraining ({pre}).")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def save(study: dict[str, Any], out: Path, columns: dict[str, str] | None = None) -> tuple[str, list[Path]]:
    """<out>/<study>-<date>.json (every run) and .md (summary_table); returns (the table, the two files)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = f"{study['meta']['study']}-{study['meta']['date']}"
    table = summary_table(study, columns)
    files = [out / f"{stamp}.json", out / f"{stamp}.md"]
    files[0].write_text(json.dumps(study, indent=1))
    files[1].write_text(table + "\n")
    return table, files
