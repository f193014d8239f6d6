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

from promptcil.config.sections import GateConfig, RegistryConfig
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
    """One input, `image`: a batch of images, each an encoded file (PNG, JPEG, WebP or GIF bytes;
    base64 text in JSON, `{"inputs": {"image": ["<base64>", ...]}}`) or the whole batch as uint8
    pixels (N, C, H, W) or (N, H, W), grey or RGB, any size (the model resizes); one class name per
    image out. `example`, the run's input example, is such a pixel batch.

    `image` is an object tensor of any length: MLflow maps a bare array onto the one input and passes
    whatever it holds to `predict`, which checks both forms (`promptcil.serving` says why no column
    or uint8 schema can take both).
    """
    if not (isinstance(example, np.ndarray) and example.dtype == np.uint8 and example.ndim in (3, 4)):
        raise ValueError(f"input example: expected uint8 images (N, C, H, W) or (N, H, W), got "
                         f"{getattr(example, 'dtype', type(example).__name__)} {getattr(example, 'shape', '')}")
    images = TensorSpec(np.dtype(object), (-1,), name="image")
    return ModelSignature(inputs=Schema([images]), outputs=Schema([ColSpec("string", name="class_name")]))


def serving_requirements() -> list[str]:
    """The pinned packages the logged model needs (promptcil itself must be installed beside them).
    Given explicitly: MLflow's inference of them imports torch in a subprocess (~8 s per version)."""
    packages = ("torch", "torchvision", "timm", "safetensors", "pydantic", "pyyaml", "numpy")
    return [*map(pinned, packages), pinned("mlflow", "mlflow-skinny")]


def pinned(*distributions: str) -> str:
    """`name==version` of the first of `distributions` installed: MLflow ships as `mlflow` or as the lighter
    `mlflow-skinny`, and the model needs the one it was logged with."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return f"{name}=={version(name)}"
        except PackageNotFoundError:
            continue
    raise RuntimeError(f"none of {', '.join(distributions)} is installed: the logged model could not name it")


MODEL_DESCRIPTION = (
    "Prompts for a frozen Vision Transformer that learn new classes task by task without keeping old data "
    "(promptcil). Every version is a candidate (tag review=pending) with the quality gate's verdict (tag gate); "
    "`promptcil review approve` records an approval and moves the alias champion, the version that serves."
)


def version_description(metrics: dict[str, Any], class_names: list[str] | None, failures: list[str]) -> str:
    """What a version learned and how it scored, for a reviewer reading the registry."""
    tasks = len(metrics["accuracy_matrix"])
    learned = f"{len(class_names)} classes ({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''})" \
        if class_names else "its classes"
    origin = f", retrained from version {metrics['retrained_from']}" if metrics.get("retrained_from") else ""
    verdict = "passed" if not failures else f"failed ({'; '.join(failures)})"
    forgetting = "–" if metrics.get("forgetting") is None else f"{metrics['forgetting']:.3f}"
    return (f"Learned {learned} in {tasks} tasks{origin}. A_last {metrics['A_last']:.3f}, forgetting {forgetting}, "
            f"newest task {metrics['accuracy_matrix'][-1][-1]:.3f}. Quality gate: {verdict}.")


def register_version(
    registry: RegistryConfig, model_uri: str, metrics: dict[str, Any], run_id: str | None = None, *,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Register `model_uri` as a new version of `registry.model_name`, tagged review=pending and
    gate=passed|failed (with gate_reasons) from `registry.gate`, described for its reviewer.

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
    client = MlflowClient()
    client.update_model_version(registry.model_name, str(version.version),
                                description=version_description(metrics, class_names, failures))
    if not client.get_registered_model(registry.model_name).description:
        client.update_registered_model(registry.model_name, description=MODEL_DESCRIPTION)
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
