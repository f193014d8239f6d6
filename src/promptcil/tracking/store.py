"""Which MLflow store promptcil talks to, and creating a new sqlite store safely.

MLFLOW_TRACKING_URI selects a store (a team's tracking server, say); without it, the embedded default
is the workspace's own sqlite file. Everything else in promptcil.tracking assumes `configure` ran.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""The store when neither MLFLOW_TRACKING_URI nor a workspace names one: the current folder's file (the CLI)."""


def configure(default: str | None = None) -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, else `default` (a workspace's sqlite store), else the current
    folder's, and keep its console quiet: no progress bar per artifact copied, no INFO lines about
    creating tables. Returns the URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default or DEFAULT_TRACKING_URI
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


def experiment_id(name: str) -> str:
    """The experiment `name`, created when missing. In a sqlite store its artifacts go beside the database
    (`<folder of mlflow.db>/mlruns`), not into the current folder's ./mlruns (MLflow's default), so a
    workspace's runs stay in the workspace whatever folder the command ran from."""
    client = MlflowClient()
    if (experiment := client.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    db = _sqlite_file(mlflow.get_tracking_uri())
    location = (db.parent / "mlruns").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a concurrent run in between
        return client.get_experiment_by_name(name).experiment_id
