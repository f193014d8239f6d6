"""MLflow tracking and registry review, on real sqlite stores.

The session's `pipeline_project` run is read, never changed: review tests register its logged model
again into a store of this module's own (each test under model names of its own), which costs
milliseconds per version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import mlflow
import mlflow.tracking._model_registry.utils as registry_utils
import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest
import torch
import yaml
from mlflow import MlflowClient

from promptcil import tracking
from promptcil.config import GateConfig, RegistryConfig
from promptcil.evaluation import predict
from promptcil.tracking import ReviewError

from conftest import NO_GATE, final_model


def use_store(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Select `uri` the way users do (MLFLOW_TRACKING_URI + configure), undone by `monkeypatch`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri exports it
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    assert tracking.configure() == uri


@pytest.fixture(scope="module")
def store(tmp_path_factory, pipeline_project) -> Iterator[str]:
    """One sqlite store for this module's review tests; each test uses model names of its own.
    (After `pipeline_project`: its register stage points MLflow at the project's store.)"""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_store(uri, monkeypatch)
        yield uri


@pytest.fixture
def name(store, request) -> str:
    """A registered-model name no other test in the module uses."""
    return request.node.name.removeprefix("test_")


def register(logged_model: dict, name: str, gate: GateConfig | None = None) -> str:
    registry = RegistryConfig(model_name=name, gate=gate or NO_GATE)
    registered = tracking.register_version(registry, logged_model["uri"], logged_model["metrics"],
                                           logged_model["run_id"])
    return registered["version"]


def tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


# ---------------------------------------------------------------- the pipeline's run


def test_pipeline_run_is_tracked_and_registered(pipeline_project):
    uri, registration = pipeline_project["tracking_uri"], pipeline_project["registration"]
    client = MlflowClient(uri, uri)
    parent = client.get_run(registration["run_id"])
    project = pipeline_project["dir"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    prepared = json.loads((project / "outputs" / "prepare" / "tasks.json").read_text())
    assert parent.data.params["train.epochs"] == str(params["train"]["epochs"])
    assert parent.data.params["backbone.embed_dim"] == str(params["backbone"]["embed_dim"])
    assert parent.data.metrics["A_last"] == pytest.approx(pipeline_project["metrics"]["A_last"])
    assert parent.data.metrics["A_avg"] == pytest.approx(pipeline_project["metrics"]["A_avg"])
    assert parent.data.tags["method"] == "apt"
    assert parent.data.tags["data_sha256"] == prepared["data"]["train"]["sha256"]
    assert parent.data.tags["git_commit"]

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(run.info.run_name for run in children) == [f"task-{t}" for t in range(prepared["num_tasks"])]
    last = f"task-{prepared['num_tasks'] - 1}"
    for run in children:
        assert {"accuracy_seen_classes", "loss", "train_samples", "base_accuracy"} <= set(run.data.metrics)
        # the last task has no next task, hence no new-class accuracy
        assert ({"next_task_class_mean_accuracy", "HM"} <= set(run.data.metrics)) == (run.info.run_name != last)
    for key in ("base_avg", "next_task_class_mean_avg", "HM_avg"):
        assert parent.data.metrics[key] == pytest.approx(pipeline_project["metrics"][key])

    assert "evaluate/metrics.json" in [f.path for f in client.list_artifacts(parent.info.run_id, "evaluate")]
    plots = [f.path for f in client.list_artifacts(parent.info.run_id, "evaluate/plots")]
    assert {"evaluate/plots/accuracy_matrix.png", "evaluate/plots/accuracy_after_task.png"} <= set(plots)
    version = client.get_model_version(registration["model_name"], registration["version"])
    assert client.get_logged_model(version.source.removeprefix("models:/")).source_run_id == parent.info.run_id
    assert version.tags["review"] == "pending"
    assert version.tags["gate"] == "passed"
    assert version.tags["run_id"] == parent.info.run_id
    assert float(version.tags["A_last"]) == pytest.approx(pipeline_project["metrics"]["A_last"], abs=1e-4)


# ---------------------------------------------------------------- review


def test_approve_makes_champion_and_moves_it(name, logged_model):
    first, second = register(logged_model, name), register(logged_model, name)
    assert tracking.champion(name) is None

    approved = tracking.approve(name, first, reviewer="ada", note="baseline")
    assert approved["aliases"] == ["champion"] and approved["review"] == "approved"
    assert tracking.champion(name)["version"] == first
    audit = tags(name, first)
    assert audit["reviewer"] == "ada" and audit["review_note"] == "baseline"
    assert datetime.fromisoformat(audit["reviewed_at"]).utcoffset().total_seconds() == 0

    moved = tracking.approve(name, second, reviewer="grace")
    assert moved["previous_champion"] == first
    assert tags(name, second)["previous_champion"] == first
    assert tracking.champion(name)["version"] == second
    listed = {v["version"]: v for v in tracking.list_versions(name)}
    assert listed[second]["aliases"] == ["champion"] and listed[first]["aliases"] == []
    assert [v["version"] for v in tracking.list_versions(name)] == [second, first]

    tracking.approve(name, first, reviewer="ada", note="roll back")  # an approved version can serve again
    assert tracking.champion(name)["version"] == first


def test_rejected_version_cannot_become_champion(name, logged_model):
    version = register(logged_model, name)
    rejected = tracking.reject(name, version, reason="misses class 7")
    assert rejected["review"] == "rejected" and rejected["note"] == "misses class 7"
    assert tags(name, version)["reject_reason"] == "misses class 7"
    with pytest.raises(ReviewError, match="was rejected \\(misses class 7\\)"):
        tracking.approve(name, version, reviewer="ada")
    assert tracking.champion(name) is None
    assert tags(name, version)["review"] == "rejected"


def test_gate_failed_cannot_be_approved(name, logged_model):
    assert logged_model["metrics"]["A_last"] < 0.99
    version = register(logged_model, name, NO_GATE.model_copy(update={"min_A_last": 0.99}))
    assert tags(name, version)["gate"] == "failed"
    with pytest.raises(ReviewError, match="failed the quality gate \\(A_last 0.\\d+ < 0.99\\)"):
        tracking.approve(name, version, reviewer="ada")
    assert tracking.champion(name) is None
    assert tags(name, version)["review"] == "pending"


def test_version_without_promptcil_tags_cannot_be_approved(name, logged_model):
    """Registered around promptcil (no gate result): the invariant still holds."""
    version = str(mlflow.register_model(logged_model["uri"], name).version)
    with pytest.raises(ReviewError, match="no quality-gate result"):
        tracking.approve(name, version, reviewer="ada")
    assert tracking.champion(name) is None


def test_version_of_another_model_name_is_refused(name, logged_model):
    alpha, beta = f"{name}-alpha", f"{name}-beta"
    register(logged_model, alpha)
    register(logged_model, alpha)
    register(logged_model, beta)
    with pytest.raises(ReviewError, match=f"'{beta}' has no version 2; version 2 belongs to .*'{alpha}'"):
        tracking.approve(beta, 2, reviewer="ada")
    with pytest.raises(ReviewError, match=f"no registered model '{name}-gamma' \\(registered: .*{alpha}, {beta}"):
        tracking.approve(f"{name}-gamma", 1, reviewer="ada")
    with pytest.raises(ReviewError, match="positive number"):
        tracking.reject(alpha, "latest", reason="x")
    assert tracking.champion(alpha) is None and tracking.champion(beta) is None


def test_rejecting_the_champion_is_refused(name, logged_model):
    version = register(logged_model, name)
    tracking.approve(name, version, reviewer="ada")
    with pytest.raises(ReviewError, match="is the champion; approve another version first"):
        tracking.reject(name, version, reason="changed my mind")
    assert tags(name, version)["review"] == "approved"
    assert tracking.champion(name)["version"] == version


# ---------------------------------------------------------------- concurrency

REGISTER_AT_ONCE = """
import json, sys, time
from pathlib import Path
from promptcil import tracking
from promptcil.config import RegistryConfig

ready, go, model_uri, metrics = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.002)
tracking.configure()
print(tracking.register_version(RegistryConfig(model_name="shared"), model_uri, metrics)["version"])
"""


def test_concurrent_registrations_get_distinct_versions(tmp_path, logged_model, monkeypatch):
    """Two processes open one fresh sqlite store and register at the same moment."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{i}" for i in range(2)]
    metrics = json.dumps({k: logged_model["metrics"][k] for k in ("A_last", "A_avg", "forgetting", "accuracy_matrix")})
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_AT_ONCE, str(ready), str(go), logged_model["uri"], metrics],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for ready in readies
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [w.communicate(timeout=120) for w in workers]
    for worker, (_, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err[-2000:]
    assert sorted(out.strip().splitlines()[-1] for out, _ in results) == ["1", "2"]

    use_store(uri, monkeypatch)
    assert [(v["version"], v["review"], v["gate"]) for v in tracking.list_versions("shared")] == [
        ("2", "pending", "failed"), ("1", "pending", "failed"),  # the tiny model fails params' default gate
    ]


# ---------------------------------------------------------------- serving


def evaluate_stage_predictions(project) -> tuple[torch.Tensor, list[str]]:
    """The test images and the class names the evaluate stage's model predicts for them."""
    p, model, test = final_model(project)
    labels = predict(model, test, p.eval.batch_size, torch.device("cpu"))
    return test.images, [test.class_names[i] for i in labels.tolist()]


def test_champion_predicts_like_the_evaluate_stage(name, logged_model, pipeline_project):
    version = register(logged_model, name)
    tracking.approve(name, version, reviewer="ada")
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, expected = evaluate_stage_predictions(pipeline_project["dir"])
    assert served.predict(images.numpy()) == expected


# ---------------------------------------------------------------- review that the MLflow UI cannot bypass


def test_a_champion_made_by_editing_tags_and_the_alias_is_refused(name, logged_model):
    """What a user of the MLflow UI can do: set review=approved and move the alias. No approval record."""
    client = MlflowClient()
    version = register(logged_model, name)
    client.set_model_version_tag(name, version, "review", "approved")
    client.set_registered_model_alias(name, tracking.CHAMPION, version)
    assert tracking.champion(name)["version"] == version  # the alias itself moved
    with pytest.raises(ReviewError, match=f"{name} version {version} carries no approval recorded by promptcil review"):
        tracking.verified_champion(name)

    tracking.approve(name, version, reviewer="ada")  # the review CLI's way: a record names this version
    assert tracking.verified_champion(name)["version"] == version
    assert "Approved by ada" in client.get_model_version(name, version).description

    other = register(logged_model, name)  # a second version, its tags and the alias edited by hand,
    record = client.get_model_version(name, version).tags["approval_run_id"]  # even with a copied record
    for key, value in {"review": "approved", "approval_run_id": record}.items():
        client.set_model_version_tag(name, other, key, value)
    client.set_registered_model_alias(name, tracking.CHAMPION, other)
    with pytest.raises(ReviewError, match=f"version {other} carries no approval recorded"):
        tracking.verified_champion(name)


def test_a_gate_tag_edited_to_passed_cannot_be_approved(tmp_path, monkeypatch):
    """The registration run's params keep the gate's verdict; a UI edit of the version's tag changes nothing."""
    from conftest import run_stages, write_params

    project = tmp_path / "project"
    project.mkdir()
    write_params(project, registry={"gate": {"min_A_last": 0.99}})
    use_store(f"sqlite:///{project / 'mlflow.db'}", monkeypatch)
    registration = run_stages(project)["registration"]
    assert registration["gate"] == "failed"
    client = MlflowClient()
    client.set_model_version_tag("promptcil", registration["version"], "gate", "passed")
    with pytest.raises(ReviewError, match="registration recorded gate=failed"):
        tracking.approve("promptcil", registration["version"], reviewer="mallory")
    assert tracking.champion("promptcil") is None


def test_predict_and_the_served_model_refuse_an_alias_moved_by_hand(logged_model, tmp_path, monkeypatch):
    """`promptcil predict models:/NAME@champion` and the pyfunc loading as the champion (what
    `mlflow models serve -m models:/NAME@champion` does) refuse a champion without an approval record.
    In a store of its own, under the name the model's params register it as (registry.model_name)."""
    from PIL import Image
    from typer.testing import CliRunner

    from promptcil.cli import app

    use_store(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch)
    name = "promptcil"
    client = MlflowClient()
    version = register(logged_model, name)
    client.set_model_version_tag(name, version, "review", "approved")
    client.set_registered_model_alias(name, tracking.CHAMPION, version)
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), 100).save(image)
    result = CliRunner().invoke(app, ["predict", f"models:/{name}@champion", str(image)])
    assert result.exit_code == 1 and "carries no approval recorded by promptcil review" in result.stderr
    with pytest.raises(ReviewError, match="carries no approval recorded"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")

    tracking.approve(name, version, reviewer="ada")  # recorded: both serve
    assert CliRunner().invoke(app, ["predict", f"models:/{name}@champion", str(image)]).exit_code == 0
    mlflow.pyfunc.load_model(f"models:/{name}@champion")


def test_the_logged_model_pins_the_mlflow_distribution_that_is_installed():
    """MLflow ships as `mlflow` or `mlflow-skinny`: the pin names whichever is installed (the first installed of
    the names), and a package under none of its names stops with a line naming them."""
    from importlib.metadata import version

    from promptcil.tracking.registry import pinned, serving_requirements

    assert f"mlflow=={version('mlflow')}" in serving_requirements()
    assert pinned("no-such-distribution", "numpy") == f"numpy=={version('numpy')}"
    with pytest.raises(RuntimeError, match="none of no-such-distribution, nor-this is installed"):
        pinned("no-such-distribution", "nor-this")
