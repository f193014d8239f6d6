"""The Prefect pipeline flow, run against a real temporary Prefect server, produces the same artifacts
as calling the stage functions directly (what `dvc repro` runs), bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import load_flow, write_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "pretrain", "features", "prototypes", "prompt_init", "train", "evaluate", "register"]


def payload_hashes(project: Path) -> dict[str, str]:
    """sha256 of every tensor file the pipeline wrote, by path relative to outputs/."""
    outputs = project / "outputs"
    return {str(p.relative_to(outputs)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(outputs.rglob("*.safetensors"))}


def manifest_sha256(project: Path, pattern: str) -> list[str]:
    return [json.loads(p.read_text())["sha256"] for p in sorted((project / "outputs" / "train").glob(pattern))]


def test_flow_reproduces_the_stage_functions_bit_for_bit(prefect_harness, pipeline_project, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    direct = pipeline_project["dir"]  # conftest: run_stages with write_params' defaults, in its own folder
    project = tmp_path / "flow"
    project.mkdir()
    write_params(project)
    assert (project / "params.yaml").read_bytes() == (direct / "params.yaml").read_bytes()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    pipeline = load_flow("pipeline").pipeline
    state = pipeline(str(project), progress=False, return_state=True)  # the workspace: not the current folder
    assert state.is_completed(), state
    result = state.result()
    summary = result["registration"]

    # the same artifacts, byte for byte
    flow_metrics = (project / "outputs" / "evaluate" / "metrics.json").read_bytes()
    assert flow_metrics == (direct / "outputs" / "evaluate" / "metrics.json").read_bytes()
    assert payload_hashes(project) == payload_hashes(direct)
    states = manifest_sha256(project, "task_*.json")
    assert len(states) == 4
    assert states == manifest_sha256(direct, "task_*.json")
    metrics = json.loads(flow_metrics)
    assert metrics["accuracy_matrix"] == pipeline_project["metrics"]["accuracy_matrix"]
    assert metrics["A_last"] == pipeline_project["metrics"]["A_last"]

    # the flow's summary: the evaluated metrics and the candidate it registered in its own MLflow store
    assert result["metrics"] == metrics
    assert summary["version"] == pipeline_project["registration"]["version"] == "1"
    assert summary["gate"] == "passed"  # write_params turns the quality gate off
    registration = json.loads((project / "outputs" / "register" / "registration.json").read_text())
    assert registration["tracking_uri"] == uri
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["A_last"] == pytest.approx(metrics["A_last"])
    version = client.get_model_version(summary["model_name"], summary["version"])
    assert version.tags["review"] == "pending"

    # Prefect recorded one completed flow run with every stage as a completed task run
    with get_client(sync_client=True) as prefect:
        flow_run_id = state.state_details.flow_run_id
        assert prefect.read_flow_run(flow_run_id).state.is_completed()
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = sorted(t.name.rsplit("-", 1)[0] for t in task_runs)
    assert names == sorted(STAGES)
    assert all(t.state.is_completed() for t in task_runs)
