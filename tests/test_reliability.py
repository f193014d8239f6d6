"""What goes wrong in unattended runs, and that promptcil says so in one line and writes nothing."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from promptcil.config import ConfigError, parse_params
from promptcil.data import DataError, ImageSet
from promptcil.entry import stage_main
from promptcil.incoming import read_incoming

from conftest import write_params


def run_stage_process(project: Path, stage: str) -> subprocess.CompletedProcess:
    """A stage exactly as `dvc repro` runs it: `python -m stages.<name>` in the project folder."""
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_stage(capsys):
    """The same entry point in this process (importing torch per case would cost seconds each)."""

    def run(project: Path, stage: str) -> subprocess.CompletedProcess:
        module = importlib.import_module(f"stages.{stage}")
        code = 0
        try:
            stage_main(module.run, module.__doc__, ["--root", str(project), "--no-progress"])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([stage], code, captured.out, captured.err)

    return run


def test_a_stage_run_as_dvc_runs_it_fails_in_one_line(tmp_path):
    write_params(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert_one_line_error(run_stage_process(tmp_path, "prepare"), "train.lr")
    assert not (tmp_path / "outputs").exists()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    """One `error:` line naming `fragments`, and the exit code of promptcil.errors' table (2 configuration,
    3 data, 4 artifact)."""
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "edit, fragments, code",
    [
        (lambda raw: raw["train"].update(lr=-0.1), ["train.lr", "greater than 0"], 2),
        (lambda raw: raw["train"].update(epochs=0), ["train.epochs"], 2),
        (lambda raw: raw["train"].update(epochz=3), ["train.epochz", "unknown key"], 2),
        (lambda raw: raw["data"].update(base_classes="four"), ["data.base_classes"], 2),
        (lambda raw: raw["data"].update(classes_per_task=4), ["data.classes_per_task", "6"], 3),
        (lambda raw: raw["data"].update(class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]), ["data.class_order"], 2),
    ],
    ids=["negative-lr", "zero-epochs", "misspelled-key", "wrong-type", "classes-not-dividing", "class-twice"],
)
def test_bad_params_stop_the_first_stage_with_one_line_and_nothing_written(tmp_path, run_stage, edit, fragments,
                                                                          code):
    write_params(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_stage(tmp_path, "prepare")
    assert_one_line_error(result, *fragments, code=code)
    assert not (tmp_path / "outputs").exists()


def write_image_tree(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def imagefolder_project(project: Path, root: Path) -> None:
    write_params(project, data={"source": "imagefolder", "root": str(root), "base_classes": 2, "classes_per_task": 1})


def test_a_corrupt_image_stops_prepare_naming_the_file(tmp_path, run_stage):
    root = tmp_path / "images"
    write_image_tree(root, {"a": 3, "b": 3, "c": 3})
    broken = root / "train" / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated mid-file
    imagefolder_project(tmp_path, root)
    assert_one_line_error(run_stage(tmp_path, "prepare"), str(broken), code=3)
    assert not (tmp_path / "outputs").exists()


def test_an_empty_class_folder_stops_prepare(tmp_path, run_stage):
    root = tmp_path / "images"
    write_image_tree(root, {"a": 2, "b": 2, "c": 2})
    for image in (root / "train" / "c").iterdir():
        image.unlink()
    imagefolder_project(tmp_path, root)
    assert_one_line_error(run_stage(tmp_path, "prepare"), "c", "no images", code=3)
    assert not (tmp_path / "outputs").exists()


def test_a_missing_data_root_stops_prepare(tmp_path, run_stage):
    imagefolder_project(tmp_path, tmp_path / "nowhere")
    assert_one_line_error(run_stage(tmp_path, "prepare"), "data.root", "does not exist", code=3)


def test_an_output_folder_that_cannot_be_written_fails_in_one_line(tmp_path, run_stage):
    """A full or read-only disk, simulated so that it holds for root too: the output folder's place
    is taken by a file, so nothing can be created under it."""
    write_params(tmp_path)
    (tmp_path / "outputs").write_text("not a folder")
    assert_one_line_error(run_stage(tmp_path, "prepare"), "cannot write", "outputs/prepare", code=4)


def test_an_incoming_class_that_already_exists_is_skipped_not_relearned(tmp_path):
    like = ImageSet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ["0", "1"])
    for name in ("1", "shoe"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    incoming, skipped = read_incoming(tmp_path, known=["0", "1"], like=like)
    assert skipped == ["1"]
    assert incoming is not None and incoming.names == ["shoe"]
    assert incoming.train.images.shape[1:] == (1, 8, 8)  # converted to the model's data: grey 8x8
    assert len(incoming.train) + len(incoming.test) == 4 and len(incoming.test) == 1


def test_an_incoming_class_with_one_image_cannot_be_split(tmp_path):
    like = ImageSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]), ["0"])
    (tmp_path / "shoe").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "shoe" / "0.png")
    with pytest.raises(DataError, match="needs at least 2 images"):
        read_incoming(tmp_path, known=["0"], like=like)


def test_a_class_listed_twice_is_a_config_error():
    with pytest.raises(ConfigError, match="data.class_order"):
        parse_params({"data": {"class_order": [0, 1, 1, 2]}})
