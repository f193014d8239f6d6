"""A study as one Prefect flow: a grid of pipeline runs (variants x protocols x seeds), every run in MLflow.

    python -m flows.study configs/studies/fidelity.yaml --data-root DIR --workers 4
    python -m flows.study configs/studies/fidelity.yaml --protocol cross-fmnist-digits --seeds 0

The study file names the protocols (a params file + presets + overrides), the seeds and the variants
(params overrides). Per protocol the variant-independent stages run once; every (variant, seed) then
runs prompt_init, train and evaluate in its own workspace under --work (flows/study_runner.py), as a
Prefect task on the flow's task runner: --workers processes (a small ViT leaves a GPU mostly idle, so
a few runs share one well). A finished run is not run again: a stopped study continues where it
stopped (a folder written with other params is computed again; code changes are not tracked: use a
new --work).

MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db): experiment study-<name>, one parent run per
invocation holding the table and JSON, one child run per grid point with its params, metrics (per task
as steps, named as in pipeline runs), params.yaml and metrics.json. The table and JSON are also
written to --out as <name>-<date>.md/.json.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ProcessPoolTaskRunner  # noqa: E402

from flows import study_runner as runner  # noqa: E402
from promptcil import tracking  # noqa: E402
from promptcil.config import load_study  # noqa: E402
from promptcil.errors import one_line_errors  # noqa: E402


@task(name="shared-stages", task_run_name="{protocol}/shared", cache_policy=NO_CACHE)
def shared_stages(protocol: str, folder: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    """prepare, pretrain, features, prototypes for one protocol."""
    return runner.run_shared(folder, params, progress=progress)


@task(name="run", task_run_name="{point.protocol}/{point.variant}/seed{point.seed}", cache_policy=NO_CACHE)
def run_point(point: runner.Point, shared: Path, probe_first_epoch: bool, threads: int) -> dict[str, Any]:
    """prompt_init, train, evaluate for one grid point in its own workspace."""
    return runner.run_point(point, shared, probe_first_epoch=probe_first_epoch, threads=threads)


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
    """Every run of the study in `spec_path` (optionally only some protocols / seeds) on this flow's task
    runner; returns {"meta", "rows", "table"}. Fails at the end, after writing what finished, if a run
    failed. `workers`: how many runs share the machine (each gets its share of the CPU threads)."""
    logger = get_run_logger()
    spec = load_study(spec_path)
    work_dir, out_dir = Path(work).resolve(), Path(out).resolve()
    plan = runner.plan(spec, protocols, seeds, Path(data_root) if data_root else None, work_dir)
    seeds = seeds or spec.seeds
    tracking.configure()
    experiment_id, parent_run_id = tracking.start_study(
        spec.name, {"protocols": ", ".join(plan.protocols), "seeds": str(seeds), "variants": len(spec.variants),
                    "workers": workers}, Path(spec_path))
    meta = runner.study_meta(spec.name, seeds) | {"spec": str(spec_path), "mlflow_run_id": parent_run_id}
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        for protocol, params in plan.protocols.items():
            shared = runner.shared_folder(work_dir, protocol)
            logger.info("%s: shared stages in %s", protocol, shared)
            meta["pretraining"][protocol] = shared_stages.submit(protocol, shared, params, progress).result()
            points = plan.points[protocol]
            futures = [run_point.submit(point, shared, spec.probe_first_epoch, threads) for point in points]
            for point, future in zip(points, futures):
                future.wait()
                if not future.state.is_completed():
                    failures.append(f"{point.label}: {future.state.message}")
                    continue
                rows.append(runner.row(point, future.result()))
                tracking.log_study_run(
                    experiment_id, parent_run_id, run_name=f"{point.variant} seed {point.seed}",
                    tags={"promptcil.study": spec.name, "protocol": point.protocol, "variant": point.variant,
                          "seed": str(point.seed), "run_dir": str(point.run_dir)},
                    params=point.params, result=rows[-1],
                    artifacts=[p for p in (point.run_dir / "params.yaml",
                                           point.run_dir / "outputs" / "evaluate" / "metrics.json") if p.is_file()])
                logger.info(runner.progress_line(len(rows) + len(failures), plan.total, point, rows[-1]))
                runner.save({"meta": meta, "rows": rows}, out_dir, spec.columns)  # what finished survives a kill
    finally:
        table, files = runner.save({"meta": meta, "rows": rows}, out_dir, spec.columns)
        tracking.end_study(parent_run_id, files, failed=bool(failures) or len(rows) < plan.total)
    if failures:
        raise RuntimeError(f"{len(failures)} of {plan.total} runs failed: " + "; ".join(failures))
    return {"meta": meta, "rows": rows, "table": table}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     epilog="MLflow: experiment study-<name>; results: --out/<name>-<date>.md/.json")
    parser.add_argument("spec", help="the study file (e.g. configs/studies/fidelity.yaml)")
    parser.add_argument("--protocol", action="append", help="run only this protocol (repeatable; default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument("--work", default="outputs/studies",
                        help="run folders: <protocol>/shared and <protocol>/<study>/<variant>/seed<N> "
                             "(default %(default)s)")
    parser.add_argument("--out", default="outputs/studies/results", help="table and JSON (default %(default)s)")
    parser.add_argument("--data-root", help="data folder: sets data.root and backbone.pretrain.root of every "
                        "protocol (Fashion-MNIST is unpacked there from Debian's package)")
    parser.add_argument("--progress", action="store_true", help="show the shared stages' progress bars")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with one_line_errors():  # a bad study file or override: one line, before Prefect starts
        runner.plan(load_study(args.spec), args.protocol, args.seeds,
                    Path(args.data_root) if args.data_root else None, Path(args.work).resolve())
        result = study.with_options(task_runner=ProcessPoolTaskRunner(max_workers=args.workers))(
            args.spec, args.protocol, args.seeds, args.workers, args.work, args.out, args.data_root, args.progress)
    print(result["table"])


if __name__ == "__main__":
    main()
