"""MLflow: one parent run per pipeline run, one nested run per task, and the registry version
that a reviewer approves. Tracking URI from MLFLOW_TRACKING_URI, else a sqlite file in the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from promptcil.config import GateConfig, RegistryConfig

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


def gate_failures(metrics: dict[str, Any], gate: GateConfig) -> list[str]:
    """Why a version fails the quality gate (empty: it passes)."""
    failures = []
    if gate.min_A_last is not None and metrics["A_last"] < gate.min_A_last:
        failures.append(f"A_last {metrics['A_last']:.3f} < {gate.min_A_last}")
    forgetting = metrics.get("forgetting")
    if gate.max_forgetting is not None and forgetting is not None and forgetting > gate.max_forgetting:
        failures.append(f"forgetting {forgetting:.3f} > {gate.max_forgetting}")
    return failures


def log_pipeline_run(
    registry: RegistryConfig,
    params: dict[str, Any],
    metrics: dict[str, Any],
    task_logs: list[dict[str, Any]],
    artifact_dirs: dict[str, Path],
    tags: dict[str, str],
    model_code: Path,
    model_artifacts: dict[str, str],
) -> dict[str, Any]:
    """Log the run and register its prompt as a new model version tagged review=pending,
    and gate=passed or gate=failed (with the reasons) from params' quality gate."""
    mlflow.set_experiment(registry.experiment)
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
            registered_model_name=registry.model_name,
        )
        run_id = parent.info.run_id
    client = MlflowClient()
    name, version = registry.model_name, str(info.registered_model_version)
    failures = gate_failures(metrics, registry.gate)
    tags = {"review": "pending", "gate": "failed" if failures else "passed", "run_id": run_id}
    if failures:
        tags["gate_reasons"] = "; ".join(failures)
    tags |= {key: f"{metrics[key]:.4f}" for key in ("A_last", "A_avg", "forgetting") if metrics.get(key) is not None}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return {"run_id": run_id, "model_name": name, "version": version, "gate": tags["gate"]}
