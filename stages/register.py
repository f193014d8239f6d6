"""register: log the pipeline run to MLflow and register the prompt as a candidate version (review=pending)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import promptcil.serving
from promptcil import tracking
from promptcil.artifacts import read_json, write_json
from promptcil.train import task_state_path

from stages.common import BACKBONE, EVALUATE, PREPARE, REGISTER, TRAIN, params, run_stage


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dvc_data_hash(lock: Path = Path("dvc.lock")) -> str:
    """DVC's hash of the prepared data (outputs/prepare) as recorded in dvc.lock; "none" outside `dvc repro`."""
    import yaml

    if not lock.is_file():
        return "none"
    outs = yaml.safe_load(lock.read_text()).get("stages", {}).get("prepare", {}).get("outs", [])
    return next((out.get("md5", "none") for out in outs if out.get("path") == str(PREPARE)), "none")


def register(params_path: str | Path = "params.yaml", out: Path = REGISTER) -> dict:
    p = params(params_path)
    uri = tracking.configure()
    metrics = read_json(EVALUATE / "metrics.json")
    prepared = read_json(PREPARE / "tasks.json")
    last = prepared["num_tasks"] - 1
    result = tracking.log_pipeline_run(
        registry=p.registry,
        params=p.model_dump(mode="json"),
        metrics=metrics,
        task_logs=read_json(TRAIN / "train_log.json")["log"],
        artifact_dirs={"evaluate": EVALUATE, "backbone": BACKBONE},
        tags={
            "git_commit": _git_commit(),
            "data_sha256": prepared["data"]["train"]["sha256"],
            "dvc_data_md5": _dvc_data_hash(),
        },
        model_code=Path(promptcil.serving.__file__),
        model_artifacts={
            "params": str(Path(params_path)),
            "backbone": str(BACKBONE),
            "task_state": str(task_state_path(TRAIN, last)),
            "task_state_manifest": str(task_state_path(TRAIN, last).with_suffix(".json")),
            "tasks": str(PREPARE / "tasks.json"),
            # held-out test images (never training data) travel with the version, so a retrain can
            # evaluate on every class seen without the pipeline's folders
            "eval_set": str(PREPARE / "test.safetensors"),
            "eval_set_manifest": str(PREPARE / "test.json"),
            "metrics": str(EVALUATE / "metrics.json"),
        },
    )
    result["tracking_uri"] = uri
    write_json(out / "registration.json", result)
    return result


if __name__ == "__main__":
    run_stage(register, *sys.argv[1:2])
