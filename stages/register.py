"""register: log the pipeline run to MLflow and register the prompt as a candidate version (review=pending)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import yaml

from promptcil import serving, tracking
from promptcil.artifacts import read_json, write_json
from promptcil.config import Params
from promptcil.data import ImageSet, read_image_set
from promptcil.data.prepared import TASKS_FILE, write_image_set
from promptcil.entry import stage_main
from promptcil.training import task_state_path
from promptcil.workspace import Workspace


def git_commit(folder) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_data_hash(workspace: Workspace) -> str:
    """DVC's hash of the prepared data (outputs/prepare) as recorded in dvc.lock; "none" outside `dvc repro`."""
    lock = workspace.root / "dvc.lock"
    if not lock.is_file():
        return "none"
    outs = yaml.safe_load(lock.read_text()).get("stages", {}).get("prepare", {}).get("outs", [])
    return next((out.get("md5", "none") for out in outs if out.get("path") == "outputs/prepare"), "none")


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    uri = tracking.configure(workspace.tracking_uri)
    prepared, evaluated = workspace.of("prepare"), workspace.of("evaluate")
    metrics = read_json(evaluated / "metrics.json")
    tasks = read_json(prepared / TASKS_FILE)
    with tempfile.TemporaryDirectory() as scratch:  # the version's params.yaml: every key, as the run used it
        params_file = Path(scratch) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        result = _log(params, workspace, metrics, tasks, params_file, eval_set(workspace, Path(scratch)))
    result["tracking_uri"] = uri
    write_json(workspace.out("register") / "registration.json", result)
    return result


def eval_set(workspace: Workspace, scratch: Path) -> Path:
    """The held-out images a version carries (a retrain's gate evaluates the champion on them): the prepared
    file, or for sharded data the test shards decoded once into the same uint8 layout."""
    prepared = workspace.of("prepare")
    test = read_image_set(prepared, "test")
    if isinstance(test, ImageSet):
        return prepared / "test.safetensors"
    write_image_set(scratch, "test", ImageSet(test.first(len(test)), test.labels, test.class_names), "shards")
    return scratch / "test.safetensors"


def _log(params: Params, workspace: Workspace, metrics: dict, tasks: dict, params_file: Path,
         eval_images: Path) -> dict:
    prepared, evaluated, trained = workspace.of("prepare"), workspace.of("evaluate"), workspace.of("train")
    return tracking.log_pipeline_run(
        registry=params.registry,
        params=params.model_dump(mode="json"),
        metrics=metrics,
        task_logs=read_json(trained / "train_log.json")["log"],
        artifact_dirs={"evaluate": evaluated, "backbone": workspace.of("pretrain"),
                       "prompt_init": workspace.of("prompt_init")},
        tags={"git_commit": git_commit(workspace.root), "data_sha256": tasks["data"]["train"]["sha256"],
              "dvc_data_md5": dvc_data_hash(workspace)},
        model_code=Path(serving.__file__),
        model_artifacts=serving.version_artifacts(
            params=params_file,
            backbone=workspace.of("pretrain"),
            task_state=task_state_path(trained, tasks["num_tasks"] - 1),
            tasks=prepared / TASKS_FILE,
            eval_set=eval_images,
            metrics=evaluated / "metrics.json",
        ),
        input_example=read_image_set(prepared, "test").first(2).numpy(),
        class_names=tasks["class_names"],
    )


if __name__ == "__main__":
    stage_main(run, __doc__)
