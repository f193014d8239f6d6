"""MLflow: one parent run per pipeline run, one nested run per task, and the registry version
that a reviewer approves. Tracking URI from MLFLOW_TRACKING_URI, else a sqlite file in the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

MODEL_NAME = "promptcil"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure(tracking_uri: str | None = None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """params.yaml as MLflow params: dotted keys, string values."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def log_pipeline_run(
    params: dict[str, Any],
    metrics: dict[str, Any],
    task_logs: list[dict[str, Any]],
    artifact_dirs: dict[str, Path],
    tags: dict[str, str],
    model_code: Path,
    model_artifacts: dict[str, str],
    experiment: str = "promptcil",
) -> dict[str, Any]:
    """Log the run and register its prompt as a new model version tagged review=pending."""
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"{params['method']['name']}-{params['data']['source']}") as parent:
        mlflow.set_tags(tags | {"method": params["method"]["name"]})
        mlflow.log_params(flatten(params))
        for t, row in enumerate(metrics["accuracy_after_task"]):
            mlflow.log_metric("accuracy_seen_classes", row, step=t)
        for key in ("A_last", "A_avg", "forgetting", "gflops_per_image", "trainable_params"):
            if metrics.get(key) is not None:
                mlflow.log_metric(key, float(metrics[key]))
        for log in task_logs:
            with mlflow.start_run(run_name=f"task-{log['task']}", nested=True):
                mlflow.log_metric("accuracy_seen_classes", metrics["accuracy_after_task"][log["task"]])
                mlflow.log_metric("train_samples", log["samples"])
                for epoch, loss in enumerate(log["epoch_losses"]):
                    mlflow.log_metric("loss", loss, step=epoch)
        for name, folder in artifact_dirs.items():
            mlflow.log_artifacts(str(folder), artifact_path=name)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(model_code), artifacts=model_artifacts,
            registered_model_name=MODEL_NAME,
        )
        run_id = parent.info.run_id
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(MODEL_NAME, version, "review", "pending")
    for key in ("A_last", "A_avg", "forgetting"):
        if metrics.get(key) is not None:
            client.set_model_version_tag(MODEL_NAME, version, key, f"{metrics[key]:.4f}")
    return {"run_id": run_id, "model_name": MODEL_NAME, "version": version}
