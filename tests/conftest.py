"""Shared fixtures: real digits data, a tiny real timm ViT, and one backbone pretrained once per session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from promptcil.config import GateConfig, Params, parse_params
from promptcil.data import ImageSet, TaskSplit, load_split, make_task_split, subset
from promptcil.model import IncrementalModel
from promptcil.pretrain import pretrain_backbone
from promptcil.training import IncrementalTrainer

torch.set_num_threads(2)

# A ViT small enough for CPU tests: 8x8 digits at 16 px, 16 patches of 4x4.
TINY_BACKBONE = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}


# The quality gate off: for tests of review mechanics on the tiny pipeline's model (which is not trained to pass it).
NO_GATE = GateConfig(**{key: None for key in GateConfig.model_fields})


def make_params(**sections: dict) -> Params:
    raw: dict = {"backbone": dict(TINY_BACKBONE), "train": {"epochs": 2, "batch_size": 32}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_params(raw)


@dataclass
class DigitsTasks:
    split: TaskSplit
    train: ImageSet  # incremental labels
    test: ImageSet


def build_model(params: Params, backbone) -> IncrementalModel:
    """The model a run starts from: the prompt's initial values come from train.seed."""
    torch.manual_seed(params.train.seed)
    return IncrementalModel.from_params(params, backbone)


def train_run(params: Params, backbone, tasks: "DigitsTasks", out, **trainer_options) -> IncrementalModel:
    """Build a model and train every task of `tasks` in `out` (resuming from its checkpoints)."""
    model = build_model(params, backbone)
    IncrementalTrainer(model, tasks.split, params.train, out, progress=False, **trainer_options).run(tasks.train)
    return model


class Interrupted(Exception):
    """Raised from a trainer's on_epoch_end callback to stop a run as a crash would."""


def interrupt_after(task: int, epoch: int):
    def stop(at_task: int, at_epoch: int) -> None:
        if (at_task, at_epoch) == (task, epoch):
            raise Interrupted

    return stop


@pytest.fixture(scope="session")
def digits_tasks() -> DigitsTasks:
    """Digits as B4 + 3 tasks of 2 (seeded class order)."""
    params = make_params()
    split = make_task_split(10, 4, 2, params.data.class_order_seed)
    train = split.relabel(load_split(params.data, "train", 16))
    test = split.relabel(load_split(params.data, "test", 16))
    return DigitsTasks(split, train, test)


def tiny_random_backbone():
    """The tiny ViT with seeded random weights (the same every call): for tests of structure and
    provenance, not accuracy."""
    from promptcil.backbone import load_backbone
    from promptcil.config import BackboneConfig

    return load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)


# Backbones are handed out fresh per test: a prompt method attaches its hooks to the backbone it is
# built on, so a shared one would carry one test's prompts into the next test's features.
@pytest.fixture
def random_backbone():
    return tiny_random_backbone()


@pytest.fixture(scope="session")
def _pretrained_once(digits_tasks: DigitsTasks):
    params = make_params(backbone={"source": "pretrain", "pretrain": {"epochs": 60, "lr": 2e-3}})
    base = subset(digits_tasks.train, list(digits_tasks.split.task_classes(0)))
    backbone = pretrain_backbone(params.backbone, base, torch.device("cpu"), progress=False).model
    return backbone


@pytest.fixture
def pretrained_backbone(_pretrained_once):
    """The B-N protocol's backbone: trained on the base classes only, then frozen (pretrained once per
    session, a copy per test)."""
    import copy

    return copy.deepcopy(_pretrained_once)


# ---------------------------------------------------------------- pipeline projects
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

TINY_PIPELINE_PARAMS = {
    "backbone": {**TINY_BACKBONE, "source": "pretrain", "pretrain": {"epochs": 10, "lr": 2e-3}},
    "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
    "registry": {"gate": NO_GATE.model_dump()},
}


def load_flow(name: str):
    """flows/<name>.py, the package module `python -m flows.<name>` runs."""
    import importlib

    return importlib.import_module(f"flows.{name}")


def write_params(project, **overrides: dict) -> None:
    """A CPU-sized params.yaml (tiny ViT, few epochs) in `project`, with per-section overrides, written
    out in full: dvc.yaml tracks whole sections and DVC fails on one missing from params.yaml."""
    import yaml

    raw = {k: dict(v) for k, v in TINY_PIPELINE_PARAMS.items()}
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    full = parse_params(raw).model_dump(mode="json")
    (project / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))


def project_params(project) -> Params:
    from promptcil.config import load_params

    return load_params(project / "params.yaml")


def run_stages_before_train(project, progress: bool = False) -> None:
    """prepare → pretrain → features → prototypes → prompt_init in the workspace `project`."""
    from promptcil.workspace import Workspace
    from stages import features, prepare, pretrain, prompt_init, prototypes

    params, workspace = project_params(project), Workspace(project)
    for stage in (prepare, pretrain, features, prototypes, prompt_init):
        stage.run(params, workspace, progress=progress)


def run_stages(project, progress: bool = False) -> dict:
    """Every stage function in order in the workspace `project` (what `dvc repro` and the flow run)."""
    from promptcil.workspace import Workspace
    from stages import evaluate, register, train

    run_stages_before_train(project, progress)
    params, workspace = project_params(project), Workspace(project)
    train.run(params, workspace, progress=progress)
    metrics = evaluate.run(params, workspace, progress=progress)
    registration = register.run(params, workspace, progress=progress)
    return {"metrics": metrics, "registration": registration}


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory):
    """One tiny pipeline run (all stages, MLflow in the project's own sqlite store), shared read-only."""
    import os

    project = tmp_path_factory.mktemp("project")
    write_params(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        result = run_stages(project)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return {"dir": project, "tracking_uri": uri, **result}


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~10 s)."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def logged_model(pipeline_project) -> dict:
    """The pipeline run's model files (registrable into any store), its run id and metrics."""
    from mlflow import MlflowClient

    uri = pipeline_project["tracking_uri"]
    client = MlflowClient(uri, uri)
    registration = pipeline_project["registration"]
    version = client.get_model_version(registration["model_name"], registration["version"])
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    return {"uri": model.artifact_location, "run_id": registration["run_id"], "metrics": pipeline_project["metrics"]}


def final_model(project):
    """The pipeline run's model after its last task, its params and its test images (on the CPU)."""
    from promptcil.data import read_image_set, read_task_split
    from promptcil.model import build_model
    from promptcil.training import load_task_state, task_state_path
    from promptcil.workspace import Workspace

    workspace, params = Workspace(project), project_params(project)
    split = read_task_split(workspace.out("prepare"))
    model = build_model(params, workspace.out("pretrain"), device=torch.device("cpu"))
    load_task_state(model, task_state_path(workspace.out("train"), split.num_tasks - 1))
    return params, model, read_image_set(workspace.out("prepare"), "test")
