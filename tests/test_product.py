"""The product's one job, tried as its users do: the default params.yaml learns every task and passes
the gate; a retrain learns the incoming classes; and a model that never learns its newest classes (the
earlier default, APT with a plain masked linear head on digits) is tagged gate=failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from promptcil import tracking
from promptcil.config import deep_merge, merged_params
from promptcil.tracking import ReviewError

from conftest import REPO, run_stages

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist")


def project_with(folder: Path, *presets: str, **overrides: dict) -> Path:
    """params.yaml of the repository with presets and overrides laid over it, on the CPU."""
    raw = merged_params(REPO / "params.yaml", *(REPO / p for p in presets))
    raw = deep_merge(deep_merge(raw, overrides), {"train": {"device": "cpu"}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def test_the_earlier_default_never_learns_its_newest_classes_and_fails_the_gate(tmp_path, monkeypatch):
    project = project_with(tmp_path / "old", "configs/digits-b4inc2.yaml",
                           method={"name": "apt"}, head={"name": "linear", "align": {"enabled": False}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    result = run_stages(project)
    metrics, registration = result["metrics"], result["registration"]
    assert metrics["A_last"] > 0.3  # what the old gate checked: it passed, having learned no new class
    assert metrics["accuracy_matrix"][-1][-1] < 0.5
    assert registration["gate"] == "failed"
    version = MlflowClient().get_model_version("promptcil", registration["version"])
    assert "newest task's classes 0." in version.tags["gate_reasons"]
    tracking.configure()
    with pytest.raises(ReviewError, match="failed the quality gate"):
        tracking.approve("promptcil", registration["version"], reviewer="ada")


def test_the_default_learns_every_task_then_a_retrain_learns_the_incoming_classes(tmp_path, monkeypatch,
                                                                                 prefect_harness):
    project = project_with(tmp_path / "default")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    result = run_stages(project)
    metrics, registration = result["metrics"], result["registration"]
    assert len(metrics["accuracy_matrix"]) == 5  # digits as 5 tasks of 2
    assert metrics["A_last"] >= 0.90, metrics["accuracy_matrix"][-1]
    assert min(metrics["accuracy_matrix"][-1]) >= 0.5  # every task, after the last
    assert registration["gate"] == "passed"
    assert metrics["A_joint"] == pytest.approx(metrics["A_last"], abs=0.01)  # the ridge head is exact
    run = MlflowClient().get_run(registration["run_id"])
    assert {"A_joint", "A_last_vs_joint", "newest_task_accuracy", "base_accuracy"} <= set(run.data.metrics)
    tracking.configure()
    tracking.approve("promptcil", registration["version"], reviewer="ada")

    if not FASHION.is_dir():
        pytest.skip("the retrain half needs Debian's dataset-fashion-mnist (make test installs it)")
    from test_retrain import load_retrain_flow, write_new_class

    for name, label in (("sneaker", 7), ("bag", 8)):
        write_new_class(project / "incoming" / name, fashion_label=label, count=60, tmp=tmp_path)
    retrained = load_retrain_flow()(str(project))
    assert retrained["status"] == "registered" and retrained["gate"] == "passed"
    client = MlflowClient()
    run = client.get_run(retrained["run_id"])
    assert run.data.metrics["incoming_accuracy"] >= 0.5
    assert {"evaluate/plots/accuracy_matrix.png", "evaluate/plots/accuracy_after_task.png"} <= {
        f.path for f in client.list_artifacts(run.info.run_id, "evaluate/plots")}
    metrics = json.loads((project / "outputs" / "retrain").glob("v1-*/version/metrics.json").__next__().read_text())
    assert metrics["incoming_accuracy"] == metrics["accuracy_matrix"][-1][-1]
