"""Scheduled retraining: new classes in the incoming folder become one new task on top of the champion.

It trains on the new classes' images ONLY, evaluates on every class seen and registers a candidate
version (review=pending) whose gate judges, among the rest, its accuracy on the incoming classes'
held-out images. The champion alias is never moved here: a reviewer approves. A crash leaves the
champion and its task list untouched, and the next run with the same champion, params and incoming
images resumes from the run's checkpoints (any other run folder starts clean).

    python -m flows.retrain [--root DIR]                 # one run now
    python -m flows.retrain --serve [--cron "0 3 * * *"] # Prefect serves it on a schedule
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from promptcil import serving, tracking
from promptcil.config import Params, load_params
from promptcil.errors import ReviewError, one_line_errors
from promptcil.incoming import IncomingClasses, read_incoming
from promptcil.retraining import (
    Champion,
    Retrained,
    evaluate_retrained,
    run_folder,
    train_new_task,
    write_version,
)
from promptcil.workspace import Workspace


@task(name="fetch-champion", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def fetch_champion(model_name: str, version: str, dst: Path) -> Champion:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    return Champion.read(version, local / "artifacts")


@task(name="train-new-task", cache_policy=NO_CACHE)
def train_task(champion: Champion, incoming: IncomingClasses, run_dir: Path, project: Params,
               progress: bool) -> Retrained:
    return train_new_task(champion, incoming, run_dir, project, progress=progress)


@task(name="register", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register(project: Params, champion: Champion, retrained: Retrained, metrics: dict[str, Any],
             incoming: IncomingClasses, artifacts: dict[str, str]) -> dict[str, Any]:
    return tracking.log_pipeline_run(
        registry=project.registry,
        params=champion.params.model_dump(mode="json"),
        metrics=metrics,
        task_logs=[{"task": log.task, "samples": log.samples, "epoch_losses": log.epoch_losses}
                   for log in retrained.logs],
        artifact_dirs={"evaluate": Path(artifacts["metrics"]).parent},
        tags={"retrained_from": champion.version, "new_classes": json.dumps(incoming.names)},
        model_code=Path(serving.__file__),
        model_artifacts=artifacts,
        input_example=retrained.test.first(2).numpy(),
        class_names=retrained.test.class_names,
    )


@flow(name="promptcil-retrain", log_prints=True)
def retrain(root: str = ".", params_file: str | None = None, progress: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    workspace = Workspace(Path(root))
    project = workspace.localise(load_params(params_file or workspace.params_file))
    tracking.configure(workspace.tracking_uri)
    name = project.registry.model_name
    serving_version = tracking.verified_champion(name)  # refused unless `promptcil review approve` recorded it
    if serving_version is None:
        raise ReviewError(f"no champion for '{name}': approve a version first (promptcil review approve)")
    version = str(serving_version["version"])
    champion = fetch_champion(name, version, project.retrain.work_dir / "champion")
    incoming, skipped = read_incoming(project.retrain.incoming, champion.tasks["class_names"], champion.test,
                                      project.retrain.test_fraction, project.train.seed)
    if skipped:
        logger.info("already learned, skipped: %s", ", ".join(skipped))
    if incoming is None:
        logger.info("no new classes in %s: nothing to do (champion is version %s)", project.retrain.incoming, version)
        return {"status": "no new classes", "champion": version}
    pending = tracking.candidate_for(name, version, incoming.names)
    if pending is not None:
        logger.info("version %s already holds classes %s on top of champion %s (review=%s): nothing to do",
                    pending.version, incoming.names, version, pending.tags.get("review"))
        return {"status": "already registered", "version": str(pending.version), "champion": version}

    run_dir = run_folder(project.retrain.work_dir, champion, incoming)
    logger.info("new task %d: classes %s (%d training images)", champion.split.num_tasks, incoming.names,
                len(incoming.train))
    retrained = train_task(champion, incoming, run_dir, project, progress)
    metrics = evaluate_retrained(champion, retrained, incoming)
    artifacts = write_version(run_dir / "version", champion, retrained, metrics)
    registered = register(project, champion, retrained, metrics, incoming, artifacts)
    logger.info("registered %s version %s (review=pending, gate=%s); A_last %.3f, incoming classes %.3f",
                name, registered["version"], registered["gate"], metrics["A_last"], metrics["incoming_accuracy"])
    return {"status": "registered", "new_classes": incoming.names, "A_last": metrics["A_last"], **registered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--root", default=".", help="the workspace: params.yaml, incoming/, outputs/ (default: here)")
    parser.add_argument("--params", help="the params file (default: ROOT/params.yaml)")
    parser.add_argument("--serve", action="store_true", help="serve on a schedule with Prefect")
    parser.add_argument("--cron", default=None, help="cron schedule (default: retrain.cron in params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = str(Path(args.root).resolve())
    with one_line_errors():
        project = load_params(args.params or Workspace(Path(root)).params_file)
        if args.serve:
            retrain.serve(name="promptcil-retrain", cron=args.cron or project.retrain.cron,
                          parameters={"root": root, "params_file": args.params})
        else:
            print(retrain(root, args.params))


if __name__ == "__main__":
    main()
