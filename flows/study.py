"""A study as one Prefect flow: a grid of pipeline runs (variants x protocols x seeds), every run in MLflow.

    python -m flows.study configs/studies/fidelity.yaml --data-root DIR --workers 4
    python -m flows.study configs/studies/fidelity.yaml --cluster cuda          # one Dask worker per GPU
    python -m flows.study configs/studies/fidelity.yaml --cluster tcp://HOST:8786  # a running scheduler

The study file names the protocols (a params file + presets + overrides), the seeds and the variants
(params overrides). Per protocol the variant-independent stages run once; every (variant, seed) then
runs prompt_init, train and evaluate in its own workspace under --work (flows/study_runner.py), as a
Prefect task on a dask.distributed cluster (prefect-dask's task runner): a LocalCluster of --workers
processes by default, a LocalCUDACluster (dask-cuda, one worker per GPU) with --cluster cuda, or the
workers of an existing scheduler (every machine sees --work at the same path, e.g. a shared file
system, and the same MLFLOW_TRACKING_URI). A run whose worker dies is run again on another (Dask
reschedules it, Prefect retries it once) and resumes from its last checkpoint. A finished run is not
run again: a stopped study continues where it stopped (a folder written with other params is computed
again; code changes are not tracked: use a new --work).

MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db): experiment study-<name>, one parent run per
invocation holding the table and JSON, one child run per grid point with its params, metrics (per task
as steps, named as in pipeline runs), params.yaml and metrics.json. The table and JSON are also
written to --out as <name>-<date>.md/.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import study_runner as runner
from promptcil import tracking
from promptcil.config import load_study
from promptcil.errors import one_line_errors


@task(name="shared-stages", task_run_name="{protocol}/shared", cache_policy=NO_CACHE)
def shared_stages(protocol: str, folder: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    """prepare, pretrain, features, prototypes for one protocol."""
    return runner.run_shared(folder, params, progress=progress)


# retried once: a run that failed for its worker (killed, out of memory) resumes from its checkpoints; a run
# that fails for its params fails again and is reported by name
@task(name="run", task_run_name="{point.protocol}/{point.variant}/seed{point.seed}", cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=1)
def run_point(point: runner.Point, shared: Path, probe_first_epoch: bool, threads: int | None) -> dict[str, Any]:
    """prompt_init, train, evaluate for one grid point in its own workspace."""
    return runner.run_point(point, shared, probe_first_epoch=probe_first_epoch, threads=threads)


@flow(name="promptcil-study", log_prints=True)
def study(
    spec_path: str,
    protocols: list[str] | None = None,
    seeds: list[int] | None = None,
    cluster: str = "local",
    workers: int = 1,
    threads: int | None = None,
    work: str = "outputs/studies",
    out: str = "outputs/studies/results",
    data_root: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every run of the study in `spec_path` (optionally only some protocols / seeds) on a Dask cluster
    (`cluster_runner`: local, cuda or a scheduler's address); returns {"meta", "rows", "table"}. Fails at
    the end, after writing what finished, if a run failed. `workers`: a local cluster's processes;
    `threads`: torch threads per run (default: a machine's CPUs shared among the runs on it)."""
    sharing = cluster_workers(cluster, workers)
    threads = threads or max(1, (os.cpu_count() or 1) // sharing)
    on_cluster = grid.with_options(task_runner=cluster_runner(cluster, workers, threads))
    return on_cluster(spec_path, protocols, seeds, sharing, work, out, data_root, progress, threads)


@flow(name="promptcil-study-grid", log_prints=True)
def grid(
    spec_path: str,
    protocols: list[str] | None,
    seeds: list[int] | None,
    workers: int,
    work: str,
    out: str,
    data_root: str | None,
    progress: bool,
    threads: int | None,
) -> dict[str, Any]:
    """The study's runs as tasks on this flow's task runner (the Dask cluster `study` chose)."""
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
    threads = threads or max(1, (os.cpu_count() or 1) // workers)  # a flow run without `study`: same share
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


def cluster_runner(cluster: str, workers: int, threads: int):
    """Prefect's Dask task runner on `cluster`: `local`, a LocalCluster of `workers` processes on this
    machine; `cuda`, a LocalCUDACluster (dask-cuda: one worker per visible GPU, each seeing only its own);
    else the address of a running Dask scheduler (`dask scheduler` + `dask worker ADDRESS` on each machine).
    A local worker's math libraries get `threads` (Dask starts them with 1): a run computes what it computes
    in a plain pipeline run with as many threads; it imports the runs' modules at start (flows/study_worker.py)
    and reports its task runs to this flow's Prefect API; a remote worker to the PREFECT_API_URL it was started
    with (docs/scaling.md)."""
    import dask
    from prefect.client.orchestration import get_client
    from prefect_dask import DaskTaskRunner

    dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": threads
                     for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    # Without an API URL in its environment, a worker's first task starts a temporary Prefect server of its own
    # (24 s before the first run on a fresh GPU worker, measured) and records its task runs there, out of sight
    # of this flow's; with PREFECT_API_URL set (a team's server) this is that URL, else this process's own
    api_url = str(get_client(sync_client=True).api_url)
    dask.config.set({"distributed.nanny.pre-spawn-environ.PREFECT_API_URL": api_url})
    # imports and the CUDA context at worker start, while the shared stages run, not in a worker's first run
    # (a keyword, not dask's config: LocalCUDACluster passes a preload of its own, which would replace it)
    preload = ["flows.study_worker"]
    if cluster == "local":
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
            "preload": preload})
    if cluster == "cuda":
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs={
            "threads_per_worker": 1, "dashboard_address": ":0", "preload": preload})
    return DaskTaskRunner(address=cluster)


def cluster_workers(cluster: str, workers: int) -> int:
    """How many runs share this machine's CPUs: --workers on a LocalCluster, one per GPU on a
    LocalCUDACluster; on a remote scheduler's machines each worker keeps its own threads (1 here)."""
    if cluster == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return workers if cluster == "local" else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     epilog="MLflow: experiment study-<name>; results: --out/<name>-<date>.md/.json")
    parser.add_argument("spec", help="the study file (e.g. configs/studies/fidelity.yaml)")
    parser.add_argument("--protocol", action="append", help="run only this protocol (repeatable; default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--cluster", default="local",
                        help="where runs go: local (a dask LocalCluster of --workers processes), cuda (one "
                             "worker per GPU, dask-cuda: pip install '.[cuda]'), or a Dask scheduler's address "
                             "(tcp://HOST:8786) (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at once on a local cluster, each in its own process (default 1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per run (default: the CPUs shared among the runs on a machine)")
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
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.cluster == "cuda" and importlib.util.find_spec("dask_cuda") is None:
        parser.error("--cluster cuda needs dask-cuda: pip install '.[cuda]'")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with one_line_errors():  # a bad study file or override: one line, before Prefect starts
        runner.plan(load_study(args.spec), args.protocol, args.seeds,
                    Path(args.data_root) if args.data_root else None, Path(args.work).resolve())
        result = study(args.spec, args.protocol, args.seeds, cluster=args.cluster, workers=args.workers,
                       threads=args.threads, work=args.work, out=args.out, data_root=args.data_root,
                       progress=args.progress)
    print(result["table"])


if __name__ == "__main__":
    main()
