"""Which numbers a run logs and under which names: the same for pipeline, retrain and study runs."""

from __future__ import annotations

from typing import Any

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


def summary_values(metrics: dict[str, Any]) -> dict[str, float]:
    """One number per run: the summary metrics present in `metrics`, plus what the last row of the accuracy
    matrix says about the newest and the base classes."""
    last_row = metrics["accuracy_matrix"][-1]
    values = dict(metrics) | {"newest_task_accuracy": last_row[-1], "base_accuracy": last_row[0]}
    return {key: float(values[key]) for key in SUMMARY_METRICS if values.get(key) is not None}


def per_task_values(metrics: dict[str, Any], task: int) -> dict[str, float]:
    """Task `task`'s per-task metrics (PER_TASK_METRICS) present in `metrics`: the next task's class-mean
    accuracy and HM do not exist for the last task, and older metrics (or a study row) may lack some."""
    values = {}
    for name, key in PER_TASK_METRICS.items():
        series = metrics.get(key) or []
        if task < len(series) and series[task] is not None:
            values[name] = float(series[task])
    return values
