"""A study as one Prefect flow: a grid of pipeline runs (variants x protocols x seeds), every run in MLflow.

    python flows/study.py configs/studies/fidelity.yaml --data-root DIR --workers 4
    python flows/study.py configs/studies/fidelity.yaml --protocol cross-fmnist-digits --seeds 0

The study file names the protocols (a params file + presets), the seeds and the variants (params
overrides). Per protocol the variant-independent stages (prepare, pretrain, features, prototypes)
run once; every (variant, seed) then runs prompt_init, train and evaluate in its own folder under
--work, with the pipeline's own stage functions (stages/grid.py). Runs go to --workers processes: a
small ViT leaves a GPU mostly idle, so a few runs share one well. A finished run keeps its
result.json and is not run again: a stopped study continues where it stopped (a folder
written with other params is computed again; code changes are not tracked: use a new --work).

MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db): experiment study-<name>, one parent run per
invocation holding the table and JSON, one child run per grid point with its params, metrics (per task
as steps, named as in pipeline runs) and metrics.json. The table and JSON are also written to --out as <name>-<date>.md/.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: stages/ is a sibling

from promptcil import tracking  # noqa: E402
from promptcil.config import ConfigError, StudySpec, load_study  # noqa: E402
from stages import grid  # noqa: E402

# Worker processes and the lock around MLflow writes: per flow run, set by `study` (tasks run in threads).
_pool: ProcessPoolExecutor | None = None
_tracking_lock = threading.Lock()


def plan(spec_path: str, protocols: list[str] | None, seeds: list[int] | None, data_root: str | None,
         work: Path) -> tuple[StudySpec, dict[str, dict[str, Any]], dict[str, list[grid.Point]]]:
    """The study file, each chosen protocol's params and its runs, every run's params checked:
    (spec, params by protocol, runs by protocol). A problem is a ConfigError before anything runs."""
    spec = load_study(spec_path)
    chosen = protocols or list(spec.protocols)
    unknown = [name for name in chosen if name not in spec.protocols]
    if unknown:
        raise ConfigError(f"{spec_path}: no protocol {', '.join(unknown)} (known: {', '.join(spec.protocols)})")
    variants = [grid.Variant(name, overrides) for name, overrides in spec.variants.items()]
    root = Path(data_root) if data_root else None
    base = {name: grid.protocol_params(spec.protocols[name], root) for name in chosen}
    runs = {name: grid.points(spec.name, variants, name, base[name], seeds or spec.seeds, work) for name in chosen}
    return spec, base, runs


@task(name="shared-stages", cache_policy=NO_CACHE)
def shared_stages(protocol: str, shared: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    """prepare, pretrain, features, prototypes for one protocol (in a worker: stages change directory)."""
    get_run_logger().info("%s: shared stages in %s", protocol, shared)
    backbone = _pool.submit(grid.prepare_protocol, shared, params, progress).result()
    return grid.pretraining_facts(backbone)


@task(name="run", task_run_name="{point.protocol}/{point.variant}/seed{point.seed}", cache_policy=NO_CACHE)
def run_point(point: grid.Point, shared: Path, probe_first_epoch: bool, experiment_id: str, parent_run_id: str,
              study_name: str) -> dict[str, Any]:
    """prompt_init, train, evaluate for one grid point in a worker; then its MLflow child run."""
    future: Future = _pool.submit(grid.run_variant, point.run_dir, shared, point.params, False, probe_first_epoch)
    result = future.result()
    artifacts = [p for p in (point.run_dir / "params.yaml", point.run_dir / "outputs" / "evaluate" / "metrics.json")
                 if p.is_file()]
    with _tracking_lock:
        tracking.log_study_run(
            experiment_id, parent_run_id, run_name=f"{point.variant} seed {point.seed}",
            tags={"promptcil.study": study_name, "protocol": point.protocol, "variant": point.variant,
                  "seed": str(point.seed), "run_dir": str(point.run_dir)},
            params=point.params, result=result, artifacts=artifacts,
        )
    return grid.row(point, result)


@flow(name="promptcil-study", log_prints=True)
def study(
    spec_path: str,
    protocols: list[str] | None = None,
    seeds: list[int] | None = None,
    workers: int = 1,
    work: str = "outputs/studies",
    out: str = "outputs/studies/results",
    data_root: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every run of the study in `spec_path` (optionally only some protocols / seeds); returns
    {"meta", "rows", "table"}. Fails at the end, after writing what finished, if a run failed."""
    global _pool
    logger = get_run_logger()
    work_dir, out_dir = Path(work).resolve(), Path(out).resolve()
    spec, base, points = plan(spec_path, protocols, seeds, data_root, work_dir)
    chosen, seeds = list(base), seeds or spec.seeds
    total = sum(len(runs) for runs in points.values())

    tracking.configure()
    experiment_id, parent_run_id = tracking.start_study(
        spec.name, {"protocols": ", ".join(chosen), "seeds": str(seeds), "variants": len(spec.variants),
                    "workers": workers}, Path(spec_path))
    meta = grid.study_meta(spec.name, seeds) | {"spec": str(spec_path), "mlflow_run_id": parent_run_id}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    cpu_threads = max(1, (os.cpu_count() or 1) // workers)
    _pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=grid.set_cpu_threads, initargs=(cpu_threads,))
    try:
        for name in chosen:
            shared = work_dir / name / "shared"
            meta["pretraining"][name] = shared_stages(name, shared, base[name], progress)
            futures = [run_point.submit(point, shared, spec.probe_first_epoch, experiment_id, parent_run_id, spec.name)
                       for point in points[name]]
            for point, future in zip(points[name], futures):
                future.wait()
                if not future.state.is_completed():
                    failures.append(f"{point.protocol}/{point.variant}/seed{point.seed}: {future.state.message}")
                    continue
                rows.append(future.result())
                logger.info(grid.progress_line(len(rows) + len(failures), total, point, rows[-1]))
                grid.save({"meta": meta, "rows": rows}, out_dir, spec.columns)  # what finished survives a kill
    finally:
        _pool.shutdown(cancel_futures=True)
        _pool = None
        result = {"meta": meta, "rows": rows}
        table, files = grid.save(result, out_dir, spec.columns)
        with _tracking_lock:
            tracking.end_study(parent_run_id, files, failed=bool(failures) or len(rows) < total)
    if failures:
        raise RuntimeError(f"{len(failures)} of {total} runs failed: " + "; ".join(failures))
    return result | {"table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="MLflow: experiment study-<name>; results: --out/<name>-<date>.md/.json")
    parser.add_argument("spec", help="the study file (e.g. configs/studies/fidelity.yaml)")
    parser.add_argument("--protocol", action="append", help="run only this protocol (repeatable; default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument("--work", default="outputs/studies",
                        help="run folders: <protocol>/shared and <protocol>/<study>/<variant>/seed<N> (default %(default)s)")
    parser.add_argument("--out", default="outputs/studies/results", help="table and JSON (default %(default)s)")
    parser.add_argument("--data-root", help="data folder: sets data.root and backbone.pretrain.root of every "
                        "protocol (Fashion-MNIST is unpacked there from Debian's package)")
    parser.add_argument("--progress", action="store_true", help="show the shared stages' progress bars")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:  # a bad study file or override: one line, before Prefect starts
        plan(args.spec, args.protocol, args.seeds, args.data_root, Path(args.work).resolve())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result = study.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.workers))(
        args.spec, args.protocol, args.seeds, args.workers, args.work, args.out, args.data_root, args.progress)
    print(result["table"])


if __name__ == "__main__":
    main()
