"""The scheduled retrain flow against a real registry: new class folder -> one new task, trained on
its own images only; a second run is a no-op; the champion never moves without a reviewer."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from contextlib import chdir
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from promptcil import tracking
from promptcil.artifacts import load_tensors

from conftest import REPO, run_stages, write_params

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)")


def load_retrain_flow():
    spec = importlib.util.spec_from_file_location("retrain_flow", REPO / "flows" / "retrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.retrain


def write_new_class(folder: Path, fashion_label: int, count: int, tmp: Path) -> None:
    """Real images of a class digits does not have (Fashion-MNIST), as PNG files."""
    from torchvision.datasets import FashionMNIST

    raw = tmp / "fm" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FASHION.glob("t10k-*.gz"):
        with gzip.open(gz) as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # FashionMNIST checks all four exist
        (raw / name).touch()
    data = FashionMNIST(tmp / "fm", train=False, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for i in (data.targets == fashion_label).nonzero().flatten()[:count].tolist():
        Image.fromarray(data.data[i].numpy()).save(folder / f"{i}.png")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_params(tmp_path)
    first = run_stages(tmp_path)["registration"]
    tracking.configure()
    tracking.approve("promptcil", first["version"], reviewer="test")
    return tmp_path


def test_new_class_becomes_one_new_task_and_second_run_is_a_noop(project, prefect_harness):
    retrain = load_retrain_flow()
    with chdir(project):
        nothing = retrain()
    assert nothing["status"] == "no new classes"

    write_new_class(project / "incoming" / "sneaker", fashion_label=7, count=16, tmp=project)
    with chdir(project):
        result = retrain()
    assert result["status"] == "registered" and result["new_classes"] == ["sneaker"]
    client = MlflowClient()
    new = client.get_model_version("promptcil", result["version"])
    assert new.tags["review"] == "pending"
    assert str(client.get_model_version_by_alias("promptcil", "champion").version) == "1"  # no reviewer, no move

    local = Path(mlflow.artifacts.download_artifacts(f"models:/promptcil/{result['version']}", dst_path=str(project / "dl")))
    metrics = json.loads((local / "artifacts" / "metrics.json").read_text())
    old = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == len(old["accuracy_matrix"]) + 1
    assert metrics["accuracy_matrix"][:-1] == [row + [None] for row in old["accuracy_matrix"]]
    tasks = json.loads((local / "artifacts" / "tasks.json").read_text())
    assert tasks["class_names"][-1] == "sneaker" and tasks["split"]["task_sizes"][-1] == 1
    # only the new class's images were trained on: 16 images, 4 held out
    _, manifest = load_tensors(next(local.glob("artifacts/task_*.safetensors")), kind="task_state")
    assert manifest["metadata"]["train_samples"] == 12
    assert manifest["metadata"]["classes_seen"] == 11

    with chdir(project):
        again = retrain()
    assert again == {"status": "already registered", "version": result["version"], "champion": "1"}
    assert len(client.search_model_versions("name='promptcil'")) == 2
