"""Registry versions: what a registered version carries (signature, requirements), the quality gate, and
registering with the review and gate tags written in the same transaction."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from promptcil.config import GateConfig, RegistryConfig
from promptcil.tracking.metrics import summary_values


def gate_failures(metrics: dict[str, Any], gate: GateConfig) -> list[str]:
    """Why a version fails the quality gate (empty: it passes). A retrain's newest task is the incoming
    classes, scored on their held-out images."""
    last_row = metrics["accuracy_matrix"][-1]
    newest = "incoming classes (held-out images)" if metrics.get("retrained_from") else "newest task's classes"
    checks = [
        ("A_last", metrics["A_last"], gate.min_A_last, "<"),
        ("forgetting", metrics.get("forgetting"), gate.max_forgetting, ">"),
        (newest, last_row[-1], gate.min_newest_task_accuracy, "<"),
        ("base classes (task 0)", last_row[0], gate.min_base_accuracy, "<"),
    ]
    failures = []
    for label, value, bound, fails_if in checks:
        if bound is None or value is None:
            continue
        if (value < bound) if fails_if == "<" else (value > bound):
            failures.append(f"{label} {value:.3f} {fails_if} {bound}")
    return failures


def model_signature(example: np.ndarray) -> ModelSignature:
    """uint8 images (N, C, H, W) in — grey or RGB, any size: the model resizes on its device — one class
    name per image out."""
    images = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([ColSpec("string", name="class_name")]))


def serving_requirements() -> list[str]:
    """The pinned packages the logged model needs (promptcil itself must be installed beside them).
    Given explicitly: MLflow's inference of them imports torch in a subprocess (~8 s per version)."""
    from importlib.metadata import version

    packages = ("torch", "torchvision", "timm", "safetensors", "pydantic", "pyyaml", "numpy", "mlflow")
    return [f"{name}=={version(name)}" for name in packages]


def register_version(
    registry: RegistryConfig, model_uri: str, metrics: dict[str, Any], run_id: str | None = None
) -> dict[str, Any]:
    """Register `model_uri` as a new version of `registry.model_name`, tagged review=pending and
    gate=passed|failed (with gate_reasons) from `registry.gate`.

    The tags are written with the version in one transaction, so no reader ever sees a version
    without its review and gate tags.
    """
    failures = gate_failures(metrics, registry.gate)
    tags = {"review": "pending", "gate": "failed" if failures else "passed"}
    if run_id is not None:
        tags["run_id"] = run_id
    if failures:
        tags["gate_reasons"] = "; ".join(failures)
    tags |= {key: f"{value:.4f}" for key, value in summary_values(metrics).items()
             if key in ("A_last", "A_avg", "forgetting", "newest_task_accuracy", "base_accuracy")}
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered..." itself
        version = mlflow.register_model(model_uri, registry.model_name, tags=tags)
    return {
        "run_id": run_id,
        "model_name": registry.model_name,
        "version": str(version.version),
        "gate": tags["gate"],
        "gate_reasons": tags.get("gate_reasons"),
        "model_uri": model_uri,
    }


def candidate_for(model_name: str, champion: str, new_classes: list[str]) -> ModelVersion | None:
    """A registered, not rejected version already retrained from `champion` on exactly `new_classes`."""
    client = MlflowClient()
    for version in client.search_model_versions(f"name='{model_name}'"):
        run_tags = client.get_run(version.run_id).data.tags if version.run_id else {}
        if (run_tags.get("retrained_from") == champion and run_tags.get("new_classes") == json.dumps(new_classes)
                and version.tags.get("review") != "rejected"):
            return version
    return None
