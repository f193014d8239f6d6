"""MLflow: one parent run per pipeline run, one nested run per task, and the registry versions
that a reviewer approves. Tracking URI from MLFLOW_TRACKING_URI, else a sqlite file in the project.

Review lives in the registry as model-version tags and one alias:
``review`` (pending → approved | rejected) and ``gate`` (passed | failed) are tags; the alias
``champion`` marks the version that serves. `approve` is the only code in promptcil that sets
the alias, and it re-reads the tags right before and right after setting it, so a version that
is not approved, or failed the quality gate, never stays champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from promptcil.config import GateConfig, RegistryConfig, flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# What one number per run says about it: logged for pipeline runs and for every run of a study.
SUMMARY_METRICS = ("A_last", "A_avg", "forgetting", "newest_task_accuracy", "base_accuracy", "incoming_accuracy",
                   "A_joint",
                   "A_last_vs_joint", "base_avg", "next_task_class_mean_avg", "HM_avg", "gflops_per_image",
                   "trainable_params")
# Per task (MLflow steps), as in pipeline runs, study runs and retrain runs: metric name -> metrics.json list.
PER_TASK_METRICS = {"accuracy_seen_classes": "accuracy_after_task",
                    "newest_task_accuracy": "newest_task_accuracy_after_task",
                    "base_accuracy": "base_after_task",
                    "next_task_class_mean_accuracy": "next_task_class_mean_after_task",
                    "HM": "HM_after_task"}
CHAMPION = "champion"


class ReviewError(ValueError):
    """A review action the registry refuses; the one-line message says why and what to do instead."""


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI (else the project's sqlite store) and keep its console quiet:
    no progress bar per artifact copied, no INFO lines about creating tables."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    db = _sqlite_file(uri)
    if db is not None:
        _create_sqlite_store(uri, db)
    return uri


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def _create_sqlite_store(uri: str, db: Path) -> None:
    """Create a new sqlite store's schema under an exclusive file lock.

    MLflow (3.17) creates the schema on first use without a lock, in both the tracking and the
    registry store, so two processes opening a fresh store at once (a scheduled retrain and a
    manual `dvc repro`) fail with "duplicate column name" or an alembic revision error. The
    first process here creates the schema; the others wait, then find it complete. Concurrent
    writes after that need no help: MLflow sets sqlite's busy_timeout (20 s) and retries
    version-number collisions, and tests/test_tracking.py registers from two processes at once.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(tempfile.gettempdir()) / f"promptcil-mlflow-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri, uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def summary_values(metrics: dict[str, Any]) -> dict[str, float]:
    """One number per run: the summary metrics present in `metrics`, plus what the last row of the accuracy
    matrix says about the newest and the base classes."""
    last_row = metrics["accuracy_matrix"][-1]
    values = dict(metrics) | {"newest_task_accuracy": last_row[-1], "base_accuracy": last_row[0]}
    return {key: float(values[key]) for key in SUMMARY_METRICS if values.get(key) is not None}


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
) -> dict[str, Any]:
    """Log the run and register its prompt as a new model version tagged review=pending,
    and gate=passed or gate=failed (with the reasons) from params' quality gate.

    `input_example`: a few uint8 images (N, C, H, W) as the model takes them; with the signature it
    tells a reviewer and `mlflow models serve` what the model expects."""
    mlflow.set_experiment(registry.experiment)
    with mlflow.start_run(run_name=f"{params['method']['name']}-{params['data']['source']}") as parent:
        mlflow.set_tags(tags | {"method": params["method"]["name"]})
        mlflow.log_params(flatten(params))
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
    return register_version(registry, info.model_uri, metrics, run_id=run_id)


def model_signature(example: np.ndarray) -> ModelSignature:
    """uint8 images (N, C, H, W) in — grey or RGB, any size: the model resizes on its device — one class
    name per image out."""
    images = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([ColSpec("string", name="class_name")]))


def start_study(name: str, params: dict[str, Any], spec_file: Path) -> tuple[str, str]:
    """The parent run of one study invocation, in experiment `study-<name>`, with the study file as an
    artifact (variant names are free text, not MLflow param keys); returns (experiment id, run id).
    The client API (explicit run ids) because the study's runs are logged from several threads."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"study-{name}")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"study-{name}")
    run = client.create_run(experiment_id, run_name=name, tags={"promptcil.study": name})
    _log_params(client, run.info.run_id, flatten(params))
    client.log_artifact(run.info.run_id, str(spec_file))
    return experiment_id, run.info.run_id


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


def end_study(run_id: str, artifacts: list[Path], failed: bool = False) -> None:
    client = MlflowClient()
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def per_task_values(metrics: dict[str, Any], task: int) -> dict[str, float]:
    """Task `task`'s per-task metrics (PER_TASK_METRICS) present in `metrics`: the next task's class-mean
    accuracy and HM do not exist for the last task, and older metrics (or a study row) may lack some."""
    values = {}
    for name, key in PER_TASK_METRICS.items():
        series = metrics.get(key) or []
        if task < len(series) and series[task] is not None:
            values[name] = float(series[task])
    return values


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


# ---------------------------------------------------------------- review


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of `model_name`, newest first, with its review state and metrics."""
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, version in _registered_model(client, model_name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    found = client.search_model_versions(filter_string=f"name = {_quoted(model_name)}")
    described = [_describe(v) for v in sorted(found, key=lambda v: int(v.version), reverse=True)]
    for row in described:  # search results leave aliases out; the registered model holds them
        row["aliases"] = sorted(aliases.get(row["version"], []))
    return described


def champion(model_name: str) -> dict[str, Any] | None:
    """The version that serves (alias `champion`); None when the model or the alias does not exist."""
    client = MlflowClient()
    version = _champion_version(client, model_name)
    return None if version is None else _describe(client.get_model_version(model_name, version))


def approve(model_name: str, version: int | str, reviewer: str, note: str | None = None) -> dict[str, Any]:
    """Approve a version and make it champion (the alias moves from the previous champion).

    Approving an earlier approved version again is how a champion is rolled back.
    """
    if not reviewer.strip():
        raise ReviewError("approving needs a reviewer name")
    client = MlflowClient()
    current = _model_version(client, model_name, version)
    number = str(current.version)  # the sqlite store returns an int, the REST store a string
    _check_can_serve(current, require_approved=False)
    previous = _champion_version(client, model_name)
    tags = {"reviewer": reviewer, "reviewed_at": _utc_now()}
    if note:
        tags["review_note"] = note
    if previous is not None and previous != number:
        tags["previous_champion"] = previous
    tags["review"] = "approved"  # last: the version reads approved only once its audit tags are there
    for key, value in tags.items():
        client.set_model_version_tag(model_name, number, key, value)
    # The invariant's check: what the store holds now, not what this call wrote (a concurrent
    # `reject` may have landed in between).
    _check_can_serve(client.get_model_version(model_name, number), require_approved=True)
    client.set_registered_model_alias(model_name, CHAMPION, number)
    after = client.get_model_version(model_name, number)
    try:
        _check_can_serve(after, require_approved=True)
    except ReviewError:
        # A reject raced the alias: give the alias back before anyone serves this version.
        if previous is not None and previous != number:
            client.set_registered_model_alias(model_name, CHAMPION, previous)
        else:
            client.delete_registered_model_alias(model_name, CHAMPION)
        raise
    # previous_champion here: the champion right before this call (None: none, or this version)
    return _describe(after) | {"previous_champion": previous if previous != number else None}


def reject(model_name: str, version: int | str, reason: str) -> dict[str, Any]:
    """Mark a version rejected: it can never be approved, so it can never serve."""
    if not reason.strip():
        raise ReviewError("rejecting needs a reason")
    client = MlflowClient()
    current = _model_version(client, model_name, version)
    number = str(current.version)
    if _champion_version(client, model_name) == number:
        raise ReviewError(_champion_refusal(model_name, number))
    before = current.tags.get("review")
    for key, value in {"reject_reason": reason, "reviewed_at": _utc_now(), "review": "rejected"}.items():
        client.set_model_version_tag(model_name, number, key, value)
    if _champion_version(client, model_name) == number:
        # An approve moved the alias here in between: it won, so undo this rejection.
        if before is None:
            client.delete_model_version_tag(model_name, number, "review")
        else:
            client.set_model_version_tag(model_name, number, "review", before)
        raise ReviewError(_champion_refusal(model_name, number))
    return _describe(client.get_model_version(model_name, number))


def _check_can_serve(version: ModelVersion, require_approved: bool) -> None:
    """Refuse a version that must not serve: gate failed or missing, rejected, (or not yet approved)."""
    tags, label = version.tags, f"{version.name} version {version.version}"
    if tags.get("gate") == "failed":
        reasons = tags.get("gate_reasons", "no reasons recorded")
        raise ReviewError(f"{label} failed the quality gate ({reasons}); it cannot be approved")
    if tags.get("gate") != "passed":
        raise ReviewError(f"{label} has no quality-gate result (tag gate); register it through promptcil")
    if tags.get("review") == "rejected":
        reason = tags.get("reject_reason", "no reason recorded")
        raise ReviewError(f"{label} was rejected ({reason}); register a new version")
    if require_approved and tags.get("review") != "approved":
        raise ReviewError(f"{label} is not approved (review={tags.get('review')}); approve it first")


def _champion_refusal(model_name: str, version: str) -> str:
    return f"{model_name} version {version} is the champion; approve another version first"


def _registered_model(client: MlflowClient, model_name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        registered = _some(_model_names(client))
        raise ReviewError(f"no registered model '{model_name}' (registered: {registered})") from None


def _model_version(client: MlflowClient, model_name: str, version: int | str) -> ModelVersion:
    number = str(version).strip()
    if not number.isdigit() or int(number) < 1:
        raise ReviewError(f"version must be a positive number, got '{version}'")
    number = str(int(number))
    _registered_model(client, model_name)
    try:
        return client.get_model_version(model_name, number)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    owners = [name for name in _model_names(client) if name != model_name and _has_version(client, name, number)]
    elsewhere = f"; version {number} belongs to {_some([repr(n) for n in owners])}" if owners else ""
    raise ReviewError(f"'{model_name}' has no version {number}{elsewhere}") from None


def _some(names: list[str], shown: int = 8) -> str:
    """Names for a one-line message: the first few, then how many more."""
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def _has_version(client: MlflowClient, model_name: str, version: str) -> bool:
    try:
        client.get_model_version(model_name, version)
        return True
    except MlflowException:
        return False


def _model_names(client: MlflowClient) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_registered_models(page_token=token)
        names += [model.name for model in page]
        token = page.token
        if not token:
            return sorted(names)


def _champion_version(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _describe(version: ModelVersion) -> dict[str, Any]:
    tags = version.tags

    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    return {
        "version": str(version.version),
        "review": tags.get("review"),
        "gate": tags.get("gate"),
        "gate_reasons": tags.get("gate_reasons"),
        "A_last": number("A_last"),
        "A_avg": number("A_avg"),
        "forgetting": number("forgetting"),
        "aliases": sorted(version.aliases),
        "run_id": tags.get("run_id") or version.run_id,
        "created": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "reviewer": tags.get("reviewer"),
        "previous_champion": tags.get("previous_champion"),
        "note": tags.get("reject_reason") if tags.get("review") == "rejected" else tags.get("review_note"),
    }


def _quoted(name: str) -> str:
    """A registered-model name as a filter-string literal (MLflow's filters have no escapes)."""
    quote = '"' if "'" in name else "'"
    if quote in name:
        raise ReviewError(f"model name {name!r} holds both quote characters; rename the model")
    return f"{quote}{name}{quote}"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
