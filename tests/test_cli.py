"""`promptcil …` through typer's CliRunner, on real sqlite stores and the session's pipeline run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow.tracking._model_registry.utils as registry_utils
import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptcil import tracking
from promptcil.cli import app
from promptcil.config import RegistryConfig
from promptcil.evaluation import predict

from conftest import NO_GATE, final_model

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def project(tmp_path, monkeypatch, logged_model) -> Iterator[Path]:
    """An empty working directory with its own store (MLFLOW_TRACKING_URI), as a user runs the CLI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri exports it
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    tracking.configure()
    yield tmp_path


def register(logged_model: dict, name: str = "promptcil") -> str:
    registry = RegistryConfig(model_name=name, gate=NO_GATE)
    registered = tracking.register_version(registry, logged_model["uri"], logged_model["metrics"])
    return registered["version"]


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- review


def test_review_list_approve_reject(project, logged_model):
    first, second = register(logged_model), register(logged_model)

    listed = runner.invoke(app, ["review", "list"])
    assert listed.exit_code == 0, listed.output
    assert "promptcil" in listed.stdout and listed.stdout.count("pending") == 2

    approved = runner.invoke(app, ["review", "approve", first, "--reviewer", "ada", "--note", "good [enough]"])
    assert approved.exit_code == 0, approved.output
    assert f"version {first} approved by ada: now champion" in approved.stdout
    assert tracking.champion("promptcil")["version"] == first

    rejected = runner.invoke(app, ["review", "reject", second, "--reason", "forgets class 3"])
    assert rejected.exit_code == 0, rejected.output
    assert "rejected: forgets class 3" in rejected.stdout

    listed = runner.invoke(app, ["review", "list"])
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert "champion" in rows[first] and "approved" in rows[first] and "rejected" in rows[second]
    assert f"version {first}: by ada: good [enough]" in listed.stdout  # user text is not rich markup

    error = one_line_error(runner.invoke(app, ["review", "approve", second, "--reviewer", "ada"]), 1)
    assert "was rejected (forgets class 3)" in error
    error = one_line_error(runner.invoke(app, ["review", "reject", first, "--reason", "oops"]), 1)
    assert "approve another version first" in error
    error = one_line_error(runner.invoke(app, ["review", "approve", "7", "--reviewer", "ada"]), 1)
    assert "'promptcil' has no version 7" in error
    assert tracking.champion("promptcil")["version"] == first


def test_model_name_defaults_to_params(project, logged_model):
    (project / "params.yaml").write_text(yaml.safe_dump({"registry": {"model_name": "digits-prod"}}))
    version = register(logged_model, "digits-prod")
    listed = runner.invoke(app, ["review", "list"])
    assert listed.exit_code == 0 and "digits-prod" in listed.stdout
    assert runner.invoke(app, ["review", "approve", version, "--reviewer", "ada"]).exit_code == 0
    assert tracking.champion("digits-prod")["version"] == version
    error = one_line_error(runner.invoke(app, ["review", "list", "--model", "nope"]), 1)
    assert "no registered model 'nope' (registered: digits-prod)" in error


def test_bad_params_is_a_one_line_error(project):
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    error = one_line_error(runner.invoke(app, ["params", "check"]), 2)
    assert error == "error: params.yaml: train.lr: Input should be greater than 0"
    # the review commands read (and check) only the registry section, for the default model name
    assert "no registered model 'promptcil'" in one_line_error(runner.invoke(app, ["review", "list"]), 1)
    (project / "params.yaml").write_text(yaml.safe_dump({"registry": {"model_name": "", "gaet": {}}}))
    assert one_line_error(runner.invoke(app, ["review", "list"]), 2).startswith("error: params.yaml: registry.")

    (project / "other.yaml").write_text("train:\n  lr: [unclosed\n")
    assert "not valid YAML" in one_line_error(runner.invoke(app, ["params", "check", "other.yaml"]), 2)
    assert "file not found" in one_line_error(runner.invoke(app, ["params", "check", "missing.yaml"]), 2)

    (project / "good.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.01}}))
    checked = runner.invoke(app, ["params", "check", "good.yaml"])
    assert checked.exit_code == 0 and checked.stdout.strip() == "OK good.yaml"


def test_presets_are_overlays_checked_with_the_params_they_change(project):
    from promptcil.config import load_params, write_resolved_params

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.05, "epochs": 3}}))
    for preset in sorted(repo_configs.glob("*.yaml")):
        checked = runner.invoke(app, ["params", "check", "--preset", str(preset)])
        assert checked.exit_code == 0, checked.output
    cross = load_params("params.yaml", repo_configs / "cross-fmnist-digits.yaml")
    assert (cross.data.source, cross.backbone.pretrain.data, cross.data.base_classes) == ("digits", "fashion_mnist", 2)
    assert (cross.train.lr, cross.train.batch_size) == (0.05, 32)  # untouched keys kept, the preset's set

    (project / "typo.yaml").write_text(yaml.safe_dump({"backbone": {"pretrain": {"epoch": 3}}}))
    error = one_line_error(runner.invoke(app, ["params", "check", "--preset", "typo.yaml"]), 2)
    assert error == ("error: params.yaml + typo.yaml: backbone.pretrain.epoch: unknown key "
                     "(check the spelling; see docs/params.md)")

    resolved = write_resolved_params(project / "outputs" / "params.resolved.yaml", "params.yaml",
                                     repo_configs / "fashion-mnist-b4inc2.yaml")
    assert load_params(resolved) == load_params("params.yaml", repo_configs / "fashion-mnist-b4inc2.yaml")


# ---------------------------------------------------------------- predict


def test_predict_prints_the_evaluate_stage_labels(project, logged_model, pipeline_project):
    p, model, test = final_model(pipeline_project["dir"])
    expected = [test.class_names[i] for i in predict(model, test, p.eval.batch_size, torch.device("cpu")).tolist()][:6]

    tracking.approve("promptcil", register(logged_model), reviewer="ada")
    files = []
    for i, image in enumerate(test.images[:6]):
        files.append(project / f"digit-{i}.png")
        Image.fromarray(image[0].numpy()).save(files[-1])  # greyscale: the CLI converts to RGB

    result = runner.invoke(app, ["predict", "models:/promptcil@champion", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{path}\t{label}" for path, label in zip(files, expected, strict=True)]

    (project / "broken.png").write_bytes(b"not an image")
    assert "cannot identify image file" in one_line_error(
        runner.invoke(app, ["predict", "models:/promptcil@champion", "broken.png"]), 3  # a data error
    )
    assert "alias nope not found" in one_line_error(
        runner.invoke(app, ["predict", "models:/promptcil@nope", str(files[0])]), 1
    )
    assert "is a file, not a model; the model comes first" in one_line_error(
        runner.invoke(app, ["predict", str(files[0]), str(files[1])]), 3  # images first: the usual slip
    )


# ---------------------------------------------------------------- serve


def test_serve_runs_the_installed_retrain_flow_from_any_folder(project, tmp_path):
    """`promptcil serve` needs no checkout: it runs the installed `flows.retrain` on the workspace --root. A
    SIGTERM to its process (a supervisor stopping it) stops the server: no process serving the workspace
    is left (the flow in a child process outlived it)."""
    import subprocess
    import sys
    import time

    import psutil

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    serve = [sys.executable, "-m", "promptcil.cli", "serve", "--root", str(workspace)]
    bad = subprocess.run(serve, cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: {workspace / 'params.yaml'}: train.lr: Input should be greater than 0"]

    (workspace / "params.yaml").write_text(yaml.safe_dump({"retrain": {"cron": "15 4 * * *"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        child = subprocess.Popen(serve, cwd=elsewhere, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while "promptcil-retrain" not in log.read_text() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            text = log.read_text()
            assert child.poll() is None, text[-3000:]  # serving: it waits for the schedule
            assert "promptcil-retrain" in text, text[-3000:]
        finally:
            child.terminate()
            child.wait(timeout=30)
    time.sleep(1)
    serving = [p.pid for p in psutil.process_iter(["cmdline"]) if str(workspace) in " ".join(p.info["cmdline"] or [])]
    assert not serving, f"still serving {workspace} after SIGTERM: {serving}"


# ---------------------------------------------------------------- help


def test_every_command_and_option_has_help():
    def walk(command, path: list[str]) -> Iterator[tuple[list[str], object]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():  # typer's own click, not `click`
            yield from walk(sub, [*path, name])

    commands = list(walk(typer.main.get_command(app), []))
    assert {" ".join(path) for path, _ in commands} >= {
        "review list", "review approve", "review reject", "predict", "params check", "serve",
    }
    for path, command in commands:
        assert command.help, f"promptcil {' '.join(path)} has no help"
        for param in command.params:
            if param.name not in ("help", "install_completion", "show_completion"):
                assert getattr(param, "help", None), f"promptcil {' '.join(path)}: {param.name} has no help"
        shown = runner.invoke(app, [*path, "--help"])
        assert shown.exit_code == 0 and "Usage" in shown.stdout, shown.output
