"""Runs: one parent run per pipeline run with a nested run per task, and a study's parent and child runs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient

from promptcil.config.base import flatten
from promptcil.config.sections import RegistryConfig
from promptcil.tracking.metrics import per_task_values, summary_values
from promptcil.tracking.registry import gate_failures, model_signature, register_version, serving_requirements
from promptcil.tracking.review import GATE_PARAM
from promptcil.tracking.store import experiment_id


def log_pipeline_run(
    registry: RegistryConfig,
    params: dict[str, Any],
    metrics: dict[str, Any],
    task_logs: list[dict[str, Any]],
    artifact_dirs: dict[str, Path],
    tags: dict[str, str],
    model_code: Path,
    model_artifacts: dict[str, str],
    input_example: np.ndarray,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Log the run and register its prompt as a new model version tagged review=pending,
    and gate=passed or gate=failed (with the reasons) from params' quality gate.

    `input_example`: a few uint8 images (N, C, H, W) as the model takes them; with the signature it
    tells a reviewer and `mlflow models serve` what the model expects."""
    mlflow.set_experiment(experiment_id=experiment_id(registry.experiment))
    with mlflow.start_run(run_name=f"{params['method']['name']}-{params['data']['source']}") as parent:
        mlflow.set_tags(tags | {"method": params["method"]["name"]})
        mlflow.log_params(flatten(params))
        # the gate's verdict as params, which no one can edit afterwards (the version's tags can be: review.py)
        failures = gate_failures(metrics, registry.gate)
        mlflow.log_params({GATE_PARAM: "failed" if failures else "passed",
                           f"{GATE_PARAM}_reasons": "; ".join(failures)[:500]})
        for t in range(len(metrics["accuracy_after_task"])):
            mlflow.log_metrics(per_task_values(metrics, t), step=t)
        mlflow.log_metrics(summary_values(metrics))
        for log in task_logs:
            with mlflow.start_run(run_name=f"task-{log['task']}", nested=True):
                mlflow.log_metrics(per_task_values(metrics, log["task"]))
                mlflow.log_metric("train_samples", log["samples"])
                for epoch, loss in enumerate(log["epoch_losses"]):
                    mlflow.log_metric("loss", loss, step=epoch)
        for name, folder in artifact_dirs.items():
            mlflow.log_artifacts(str(folder), artifact_path=name)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(model_code), artifacts=model_artifacts,
            pip_requirements=serving_requirements(), signature=model_signature(input_example),
            input_example=input_example,
        )
        run_id = parent.info.run_id
    return register_version(registry, info.model_uri, metrics, run_id=run_id, class_names=class_names)


def start_study(name: str, params: dict[str, Any], spec_file: Path) -> tuple[str, str]:
    """The parent run of one study invocation, in experiment `study-<name>`, with the study file as an
    artifact (variant names are free text, not MLflow param keys); returns (experiment id, run id).
    The client API (explicit run ids) because the study's runs are logged from several threads."""
    client = MlflowClient()
    study_experiment = experiment_id(f"study-{name}")
    run = client.create_run(study_experiment, run_name=name, tags={"promptcil.study": name})
    _log_params(client, run.info.run_id, flatten(params))
    client.log_artifact(run.info.run_id, str(spec_file))
    return study_experiment, run.info.run_id


def log_study_run(
    experiment_id: str,
    parent_run_id: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    result: dict[str, Any],
    artifacts: list[Path],
) -> str:
    """One finished run of a study as a child of the study's run: its full params, the summary
    metrics, the mean training time per task, and per task (as steps) the accuracy on the classes seen
    and the base/new/HM accuracies, under the names pipeline runs use."""
    from mlflow.entities import Metric

    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags=tags | {"mlflow.parentRunId": parent_run_id})
    run_id = run.info.run_id
    _log_params(client, run_id, flatten(params))
    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in summary_values(result).items()]
    seconds = result.get("seconds_per_task") or []
    if seconds:
        metrics.append(Metric("seconds_per_task", sum(seconds) / len(seconds), now, 0))
    for task in range(len(result.get("accuracy_after_task") or [])):  # per task, as in pipeline runs
        metrics += [Metric(key, value, now, task) for key, value in per_task_values(result, task).items()]
    client.log_batch(run_id, metrics=metrics)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def end_study(run_id: str, artifacts: list[Path], *, failed: bool = False) -> None:
    client = MlflowClient()
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])
