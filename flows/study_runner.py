"""The one study runner: a study file's grid of pipeline runs, each in its own workspace.

A study is variants x protocols x seeds (configs/studies/*.yaml). Per protocol the stages that do not
depend on the variant (prepare, pretrain, features, prototypes) run once, with the protocol's params and
seed 0, in `<work>/<protocol>/shared`: the backbone is the same for every variant and seed, so
differences between rows are the method's, not the backbone's (DVC's run cache gives `dvc exp run` the
same sharing). Per run, prompt_init, train and evaluate run in `<work>/<protocol>/<study>/<variant>/
seed<N>`, a workspace on top of the shared one: exactly the files `dvc repro` would produce. Every
folder records its producer (the params and the sha256 of the shared outputs it read): a finished run
keeps its result.json and is not run again, so a stopped study continues; a folder written with other
params or from other shared outputs starts clean. Code changes are not tracked: use a new --work.

Nothing here imports Prefect: the study flow (flows/study.py) calls these functions from its tasks,
in threads, processes or Dask workers, and logs the results to MLflow.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from promptcil.artifacts import ArtifactKind, load_tensors, read_json, write_json
from promptcil.config import ConfigError, StudySpec, deep_merge, flatten, merged_raw
from promptcil.data.prepared import images_sha256
from promptcil.provenance import artifact_sha256, claim, file_sha256, producer_record
from promptcil.workspace import SHARED_STAGES, Workspace

REPO = Path(__file__).resolve().parents[1]
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Point:
    """One run of a study: where it runs and with which params."""

    protocol: str
    variant: str
    seed: int
    run_dir: Path
    params: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.protocol}/{self.variant}/seed{self.seed}"


@dataclass(frozen=True)
class Plan:
    spec: StudySpec
    protocols: dict[str, dict[str, Any]]  # name -> the protocol's params (raw)
    points: dict[str, list[Point]]  # name -> its runs

    @property
    def total(self) -> int:
        return sum(len(runs) for runs in self.points.values())


def protocol_params(files: list[str], overrides: dict[str, Any], data_root: Path | None = None) -> dict[str, Any]:
    """A protocol's params: the first file with the others and `overrides` laid over it, relative paths
    from the repository. `data_root` (a folder holding Fashion-MNIST, say) sets data.root and
    backbone.pretrain.root."""
    paths = [Path(f) if Path(f).is_absolute() else REPO / f for f in files]
    raw = deep_merge(merged_raw(*paths), overrides)
    if data_root is not None:
        root = str(Path(data_root).resolve())
        raw = deep_merge(raw, {"data": {"root": root}, "backbone": {"pretrain": {"root": root}}})
    return raw


def shared_params() -> tuple[str, ...]:
    """The params the shared stages read, as dvc.yaml declares them (one source for DVC and studies), less
    train.seed: the shared stages run with seed 0 and the study's seeds per run."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return tuple(key for stage in SHARED_STAGES for key in stages[stage].get("params", []) if key != "train.seed")


def shared_keys(overrides: dict[str, Any]) -> list[str]:
    """The dotted keys of `overrides` that the shared stages read: a variant may not change them."""
    read = shared_params()
    return [key for key in flatten(overrides) if any(key == s or key.startswith(s + ".") for s in read)]


def plan(spec: StudySpec, protocols: list[str] | None, seeds: list[int] | None, data_root: Path | None,
         work: Path) -> Plan:
    """Each chosen protocol's params and runs, every run's params checked: a problem is a one-line
    ConfigError before anything runs."""
    from promptcil.config import parse_params

    chosen = protocols or list(spec.protocols)
    unknown = [name for name in chosen if name not in spec.protocols]
    if unknown:
        raise ConfigError(f"study {spec.name}: no protocol {', '.join(unknown)} (known: {', '.join(spec.protocols)})")
    base: dict[str, dict[str, Any]] = {}
    points: dict[str, list[Point]] = {}
    for protocol in chosen:
        raw = protocol_params(spec.protocols[protocol].files, spec.protocols[protocol].set, data_root)
        parse_params(raw, f"study {spec.name}, protocol {protocol}")
        base[protocol], points[protocol] = raw, []
        for variant, overrides in spec.variants.items():
            if keys := shared_keys(overrides):
                raise ConfigError(f"study {spec.name}: variant '{variant}' changes {', '.join(keys)}, which the "
                                  f"shared stages ({', '.join(SHARED_STAGES)}) use: make it a protocol of its own")
            slug = re.sub(r"[^A-Za-z0-9._-]+", "-", variant)
            for seed in seeds or spec.seeds:
                params = deep_merge(deep_merge(raw, overrides), {"train": {"seed": seed}})
                parse_params(params, f"study {spec.name}, variant '{variant}', seed {seed}")
                run_dir = (Path(work) / protocol / spec.name / slug / f"seed{seed}").resolve()
                points[protocol].append(Point(protocol, variant, seed, run_dir, params))
    return Plan(spec, base, points)


def shared_folder(work: Path, protocol: str) -> Path:
    return (Path(work) / protocol / "shared").resolve()


def run_shared(folder: Path, raw: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """The variant-independent stages of a protocol, once (a folder holding them for these params is kept);
    returns what the table's footnote says about the backbone."""
    from promptcil.config import parse_params
    from stages import features, prepare, pretrain, prototypes

    raw = deep_merge(raw, {"train": {"seed": 0}})
    workspace = Workspace(folder)
    done = workspace.out("prototypes") / "prototypes.safetensors"
    if not (claim(folder, producer_record(raw, {})) and done.exists()):
        params = parse_params(raw, str(folder))
        for stage in (prepare, pretrain, features, prototypes):
            stage.run(params, workspace, progress=progress)
    backbone = read_json(workspace.out("pretrain") / "backbone.json")
    return {"data": backbone.get("data", backbone.get("source")), "images": backbone.get("train_images"),
            "seconds": backbone.get("seconds")}


def shared_inputs(shared: Workspace) -> dict[str, str]:
    """The sha256 of what a run reads from its protocol's shared outputs."""
    from promptcil.features import TOKEN_SAMPLE_FILE

    return {"tasks": file_sha256(shared.out("prepare") / "tasks.json"),
            "train_images": images_sha256(shared.out("prepare"), "train"),
            "backbone": read_json(shared.out("pretrain") / "backbone.json")["weights_sha256"],
            "features": artifact_sha256(shared.out("features") / "features.safetensors"),
            "token_sample": artifact_sha256(shared.out("features") / TOKEN_SAMPLE_FILE),
            "prototypes": artifact_sha256(shared.out("prototypes") / "prototypes.safetensors")}


def run_point(point: Point, shared_root: Path, *, probe_first_epoch: bool = False, threads: int | None = None,
              progress: bool = False) -> dict[str, Any]:
    """prompt_init, train and evaluate for one run in its own workspace on top of the shared one (any thread
    or process); with `probe_first_epoch` (trained heads) also task 0's test accuracy after its first epoch."""
    import torch

    from promptcil.config import parse_params
    from promptcil.training import CheckpointStore
    from stages import evaluate, prompt_init, train

    if threads:
        torch.set_num_threads(threads)
    shared = Workspace(shared_root)
    workspace = Workspace(point.run_dir).on_top_of(shared)
    result_file = point.run_dir / RESULT_FILE
    if claim(point.run_dir, producer_record(point.params, shared_inputs(shared))) and result_file.exists():
        return read_json(result_file)
    params = parse_params(point.params, str(point.run_dir))
    from promptcil.artifacts import atomic_write_bytes

    atomic_write_bytes(point.run_dir / "params.yaml", yaml.safe_dump(point.params, sort_keys=False).encode())
    started, started_at = time.perf_counter(), time.time()
    prompt_init.run(params, workspace, progress=progress)
    stage_seconds = {"prompt_init": time.perf_counter() - started}
    after_first_epoch: dict[str, torch.Tensor] = {}

    def keep_first_epoch(task: int, epoch: int) -> None:
        if probe_first_epoch and (task, epoch) == (0, 0):
            after_first_epoch.update(CheckpointStore(workspace.out("train"), {}).first_epoch_state())

    log = train.run(params, workspace, progress=progress, on_epoch_end=keep_first_epoch)
    stage_seconds["train"] = time.perf_counter() - started - sum(stage_seconds.values())
    metrics = evaluate.run(params, workspace, progress=progress)
    stage_seconds["evaluate"] = time.perf_counter() - started - sum(stage_seconds.values())
    last_state = sorted(workspace.out("train").glob("task_*.safetensors"))[-1]
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
        "run_seconds": time.perf_counter() - started,
        "stage_seconds": stage_seconds,
        "run_window_seconds": [started_at, time.time()],  # wall-clock start and end: a grid's span, runs per hour
        # where it ran: a cluster's schedule (which worker took which run, and when) can be read back from the rows
        "worker": f"{socket.gethostname()} pid {os.getpid()} GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}",
        "first_epoch_accuracy": first_epoch_accuracy(params, workspace, after_first_epoch) if after_first_epoch
        else None,
    }
    write_json(result_file, result)
    return result


def head_bytes(task_state: Path) -> int:
    """What the head keeps between tasks (for the ridge head: its float64 running sums)."""
    tensors, _ = load_tensors(task_state, kind=ArtifactKind.TASK_STATE)
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("head."))


def first_epoch_accuracy(params: Any, workspace: Workspace, state: dict[str, Any]) -> float:
    """Task 0's test accuracy of the model state committed after task 0's first epoch."""
    from promptcil.data import read_image_set, read_task_split, subset
    from promptcil.evaluation import predict
    from promptcil.model import build_model
    from promptcil.runtime import resolve_device

    p = workspace.localise(params)
    model = build_model(p, workspace.of("pretrain"))
    model.load_trainable_state(state)
    prepared = workspace.of("prepare")
    test = subset(read_image_set(prepared, "test", p.data), list(read_task_split(prepared).task_classes(0)))
    return float(
        (predict(model, test, p.eval.batch_size, resolve_device(p.train.device)) == test.labels).float().mean())


# ---------------------------------------------------------------- results


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def study_meta(name: str, seeds: list[int]) -> dict[str, Any]:
    import torch

    return {"study": name, "device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "seeds": seeds, "pretraining": {}}


def row(point: Point, result: dict[str, Any]) -> dict[str, Any]:
    return {"protocol": point.protocol, "variant": point.variant, "seed": point.seed, **result}


def progress_line(done: int, total: int, point: Point, result: dict[str, Any]) -> str:
    return (f"[{done}/{total}] {point.protocol} {point.variant} seed {point.seed}: "
            f"A_last {result['A_last']:.3f} A_avg {result['A_avg']:.3f}")


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
    for r in study["rows"]:
        groups.setdefault((r["protocol"], r["variant"]), []).append(r)
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
            *(mean_std([r[key] for r in rows]) if all(r.get(key) is not None for r in rows) else "–"
              for key in columns.values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    meta = study["meta"]
    pre = "; ".join(f"{k}: {v['images']} images, {v['seconds'] or 0:.0f} s" for k, v in meta["pretraining"].items())
    lines += ["", f"{meta['device']}, torch {meta['torch']}, {meta['date']}, seeds {meta['seeds']}; "
                  f"backbone pretraining ({pre})."]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def save(study: dict[str, Any], out: Path, columns: dict[str, str] | None = None) -> tuple[str, list[Path]]:
    """<out>/<study>-<date>.json (every run) and .md (summary_table); returns (the table, the two files)."""
    from promptcil.artifacts import atomic_write_bytes

    stamp = f"{study['meta']['study']}-{study['meta']['date']}"
    table = summary_table(study, columns)
    files = [Path(out) / f"{stamp}.json", Path(out) / f"{stamp}.md"]
    write_json(files[0], study)
    atomic_write_bytes(files[1], (table + "\n").encode())
    return table, files
