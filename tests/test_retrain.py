"""The scheduled retrain flow against a real registry: new class folder -> one new task, trained on
its own images only; a second run is a no-op; the champion never moves without a reviewer."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from promptcil import tracking
from promptcil.artifacts import load_tensors

from conftest import run_stages, write_params

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist (make test installs it)")


def load_retrain_flow():
    from flows.retrain import retrain

    return retrain


def write_new_class(folder: Path, fashion_label: int, count: int, tmp: Path, skip: int = 0) -> None:
    """Real images of a class digits does not have (Fashion-MNIST), as PNG files: `count` of the class's test
    images after the first `skip`."""
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
    for i in (data.targets == fashion_label).nonzero().flatten()[skip:skip + count].tolist():
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
    nothing = retrain(str(project))
    assert nothing["status"] == "no new classes"

    write_new_class(project / "incoming" / "sneaker", fashion_label=7, count=16, tmp=project)
    result = retrain(str(project))
    assert result["status"] == "registered" and result["new_classes"] == ["sneaker"]
    client = MlflowClient()
    new = client.get_model_version("promptcil", result["version"])
    assert new.tags["review"] == "pending"
    assert str(client.get_model_version_by_alias("promptcil", "champion").version) == "1"  # no reviewer, no move

    local = Path(mlflow.artifacts.download_artifacts(f"models:/promptcil/{result['version']}",
                                                     dst_path=str(project / "dl")))
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

    again = retrain(str(project))
    assert again == {"status": "already registered", "version": result["version"], "champion": "1"}
    assert len(client.search_model_versions("name='promptcil'")) == 2


def test_retrain_continues_base_and_new_with_the_champion_meeting_the_new_classes(project, prefect_harness):
    """DePT's base/new continues across a retrain: the champion's entries are kept, the champion's last task
    gets its "new" (the incoming classes among themselves, by class means of the untrained champion), base
    is the accuracy on all classes seen, and HM their harmonic mean."""
    from promptcil.evaluation import harmonic_mean

    for name, label in (("sneaker", 7), ("bag", 8)):
        write_new_class(project / "incoming" / name, fashion_label=label, count=16, tmp=project)
    result = load_retrain_flow()(str(project))
    assert result["status"] == "registered" and sorted(result["new_classes"]) == ["bag", "sneaker"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/promptcil/{result['version']}",
                                                     dst_path=str(project / "dl")))
    metrics = json.loads((local / "artifacts" / "metrics.json").read_text())
    old = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    tasks = len(old["next_task_class_mean_after_task"]) + 1
    assert metrics["next_task_class_mean_after_task"][: tasks - 2] == old["next_task_class_mean_after_task"][:-1]
    champion_new = metrics["next_task_class_mean_after_task"][tasks - 2]
    assert champion_new is not None and 0.0 <= champion_new <= 1.0
    assert metrics["next_task_class_mean_after_task"][-1] is None  # nothing after the new task yet
    assert metrics["base_after_task"] == metrics["accuracy_after_task"]
    assert metrics["HM_after_task"][tasks - 2] == harmonic_mean(metrics["base_after_task"][tasks - 2], champion_new)
    run = MlflowClient().get_run(MlflowClient().get_model_version("promptcil", result["version"]).run_id)
    assert run.data.metrics["next_task_class_mean_avg"] == pytest.approx(metrics["next_task_class_mean_avg"])


def write_digits_tree(root: Path, classes: list[int], train_images: dict[int, list] | None = None) -> None:
    """Real digits as an ImageFolder tree of 8x8 PNGs (stratified split of scikit-learn's digits)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=0.25, random_state=0,
                                                        stratify=digits.target)
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        for c in classes:
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            chosen = train_images[c] if split == "train" and train_images and c in train_images else xs[ys == c]
            for i, image in enumerate(chosen):
                Image.fromarray(np.asarray(image)).save(folder / f"{i}.png")


def test_retrained_ridge_head_equals_a_from_scratch_run_on_all_classes(tmp_path, monkeypatch, prefect_harness):
    """The ridge head's sums restored from the champion plus the new class's sums are exactly the
    head of a run that saw every class from the start (fixed features: no prompt, seeded backbone)."""
    import numpy as np
    import torch

    from promptcil.data import ImageSet
    from promptcil.incoming import read_incoming

    head = {"name": "ridge", "ridge": {"projection_dim": 64, "ridge": 1.0}}
    common = dict(method={"name": "none"}, head=head, backbone={"source": "random"})
    # the champion: digits 0-7 as B2 + 3 tasks of 2; digit 8 arrives later through incoming/
    old = tmp_path / "old"
    write_digits_tree(old / "images", list(range(8)))
    write_params(old, data={"source": "imagefolder", "root": str(old / "images"), "image_size": 8,
                            "base_classes": 2, "classes_per_task": 2, "class_order": list(range(8))}, **common)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{old / 'mlflow.db'}")
    first = run_stages(old)["registration"]
    tracking.configure()
    tracking.approve("promptcil", first["version"], reviewer="test")
    write_digits_tree(old / "incoming_tree", [8])
    (old / "incoming").mkdir()
    shutil.move(old / "incoming_tree" / "train" / "8", old / "incoming" / "8")
    result = load_retrain_flow()(str(old))
    assert result["status"] == "registered"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/promptcil/{result['version']}",
                                                     dst_path=str(tmp_path / "dl")))
    retrained, _ = load_tensors(next(local.glob("artifacts/task_*.safetensors")), kind="task_state")

    # from scratch: every class from the start, digit 8 with exactly the images the retrain trained on
    like = ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]), ["0"])
    incoming, _ = read_incoming(old / "incoming", [str(c) for c in range(8)], like, 0.25, seed=0)
    fresh = tmp_path / "fresh"
    write_digits_tree(fresh / "images", list(range(9)),
                      train_images={8: [np.asarray(img).transpose(1, 2, 0) for img in incoming.train.images]})
    write_params(fresh, data={"source": "imagefolder", "root": str(fresh / "images"), "image_size": 8,
                              "base_classes": 3, "classes_per_task": 3, "class_order": list(range(9))}, **common)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh / 'mlflow.db'}")
    run_stages(fresh)
    scratch, _ = load_tensors(fresh / "outputs" / "train" / "task_02.safetensors", kind="task_state")
    for key in ("head.gram", "head.targets"):
        torch.testing.assert_close(retrained[key], scratch[key], rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(retrained["head.weight"], scratch["head.weight"], rtol=1e-4, atol=1e-5)
