"""register: log the pipeline run to MLflow and register the prompt as a candidate version (review=pending)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import promptcil.serving
from promptcil import tracking
from promptcil.artifacts import read_json, write_json
from promptcil.train import task_state_path

from stages.common import BACKBONE, EVALUATE, PREPARE, PROMPT_INIT, REGISTER, TRAIN, image_set, params, run_stage


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
        artifact_dirs={"evaluate": EVALUATE, "backbone": BACKBONE, "prompt_init": PROMPT_INIT},
        tags={
            "git_commit": _git_commit(),
            "data_sha256": prepared["data"]["train"]["sha256"],
            "dvc_data_md5": _dvc_data_hash(),
        },
        model_code=Path(promptcil.serving.__file__),
        model_artifacts=promptcil.serving.version_artifacts(
            params=Path(params_path),
            backbone=BACKBONE,
            task_state=task_state_path(TRAIN, last),
            tasks=PREPARE / "tasks.json",
            eval_set=PREPARE / "test.safetensors",
            metrics=EVALUATE / "metrics.json",
        ),
        input_example=image_set("test").images[:2].numpy(),
    )
    result["tracking_uri"] = uri
    write_json(out / "registration.json", result)
    return result


if __name__ == "__main__":
    run_stage(register, *sys.argv[1:2])
