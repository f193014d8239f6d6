"""MLflow, the only code in promptcil that talks to it, one job per module: which store (store.py),
what a run logs and under which names (metrics.py, runs.py), registry versions and the quality gate
(registry.py), and the review state machine (review.py).

Names are imported from their module on first use: `promptcil review list` then loads MLflow's client
and store, not its model-logging machinery (signatures, pyfunc), which only a registration needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "DEFAULT_TRACKING_URI": "store", "configure": "store",
    "PER_TASK_METRICS": "metrics", "SUMMARY_METRICS": "metrics", "per_task_values": "metrics",
    "summary_values": "metrics",
    "candidate_for": "registry", "gate_failures": "registry", "model_signature": "registry",
    "register_version": "registry", "serving_requirements": "registry",
    "CHAMPION": "review", "approve": "review", "champion": "review", "list_versions": "review", "reject": "review",
    "verified_champion": "review", "verify_approval": "review", "champion_of_uri": "review",
    "refuse_unapproved_champion": "review",
    "end_study": "runs", "log_pipeline_run": "runs", "log_study_run": "runs", "start_study": "runs",
}


def __getattr__(name: str) -> Any:
    if name == "ReviewError":
        from promptcil.errors import ReviewError

        return ReviewError
    if name in _HOMES:
        return getattr(import_module(f"promptcil.tracking.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'promptcil.tracking' has no attribute '{name}'")


__all__ = ["ReviewError", *_HOMES]
