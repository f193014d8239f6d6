"""Only the producer of a resumable folder resumes it: a rerun with other params or inputs over existing
outputs starts clean (one line says so) and ends bit-identical to a run from clean outputs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from promptcil.provenance import RECORD_FILE, claim, producer_record

from conftest import project_params, run_stages_before_train, write_params

pytestmark = pytest.mark.slow


def test_claim_resumes_its_own_folder_and_empties_another_producers(tmp_path, caplog):
    folder, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("not ours to delete")
    mine = producer_record({"head": {"name": "linear"}, "train": {"lr": 0.01}}, {"backbone": "ab12"})
    assert claim(folder, mine) is False  # new: nothing to resume, the record comes first
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "ckpt.bin").write_bytes(b"x")
    (folder / "link").symlink_to(outside, target_is_directory=True)
    assert claim(folder, mine) is True
    assert (folder / "checkpoints" / "ckpt.bin").exists()

    other = producer_record({"head": {"name": "ridge"}, "train": {"lr": 0.01}}, {"backbone": "cd34"})
    with caplog.at_level(logging.WARNING, logger="promptcil"):
        assert claim(folder, other) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder} was written with other inputs.backbone, params.head.name: starting clean"]
    assert sorted(p.name for p in folder.iterdir()) == [RECORD_FILE]  # everything of the other producer is gone
    assert json.loads((folder / RECORD_FILE).read_text()) == other
    assert (outside / "kept.txt").exists()  # a link is removed, never followed

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "task_00.safetensors").write_bytes(b"?")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="promptcil"):
        assert claim(stray, mine) is False
    assert "without a producer record: starting clean" in caplog.records[0].getMessage()
    assert sorted(p.name for p in stray.iterdir()) == [RECORD_FILE]


def outputs_of(project: Path) -> dict[str, str]:
    """sha256 of what train and evaluate wrote (the seconds a task took excepted), by relative path."""
    hashes = {}
    for path in sorted((project / "outputs").rglob("*")):
        relative = str(path.relative_to(project / "outputs"))
        if not path.is_file() or not relative.startswith(("train/", "evaluate/")):
            continue
        data = path.read_bytes()
        if path.name == "train_log.json":
            log = json.loads(data)
            data = json.dumps([{k: v for k, v in task.items() if not k.endswith("seconds")}
                               for task in log["log"]]).encode()
        elif path.name == "evaluate.json":  # how the work was split, and how long it took
            data = json.dumps({k: v for k, v in json.loads(data).items() if not k.endswith("seconds")}).encode()
        elif path.suffix == ".json" and path.parent.name == "train" and path.name.startswith("task_"):
            manifest = json.loads(data)  # a task state's manifest records its training time too
            manifest["metadata"].pop("seconds")
            data = json.dumps(manifest, sort_keys=True).encode()
        hashes[relative] = hashlib.sha256(data).hexdigest()
    return hashes


def run_all(project: Path) -> dict[str, str]:
    from promptcil.workspace import Workspace
    from stages import evaluate, train

    run_stages_before_train(project)
    params, workspace = project_params(project), Workspace(project)
    train.run(params, workspace, progress=False)
    evaluate.run(params, workspace, progress=False)
    return outputs_of(project)


# (name, params overrides): another head over the default's outputs (the old KeyError), then another
# split and method, the way a preset changes a run (the old silent continuation of the previous tasks)
CHANGES = [
    ("another head", {"head": {"name": "ridge", "ridge": {"projection_dim": 128}}}),
    ("another preset", {"data": {"base_classes": 2, "classes_per_task": 2}, "method": {"name": "vpt"},
                        "head": {"name": "cat"}}),
]


def test_a_rerun_with_other_params_over_existing_outputs_equals_a_clean_run(tmp_path, caplog):
    reused = tmp_path / "reused"
    reused.mkdir()
    write_params(reused)
    first = run_all(reused)
    assert first and any(name.startswith("train/task_03") for name in first)
    for name, overrides in CHANGES:
        clean = tmp_path / name.replace(" ", "-")
        clean.mkdir()
        write_params(clean, **overrides)
        write_params(reused, **overrides)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="promptcil"):
            rerun = run_all(reused)
        assert rerun == run_all(clean), name
        lines = [r.getMessage() for r in caplog.records if "starting clean" in r.getMessage()]
        assert len(lines) == 1 and "outputs/train was written with other " in lines[0]
        assert ".head." in lines[0]


def test_an_interrupted_run_whose_inputs_changed_starts_clean(random_backbone, digits_tasks, tmp_path):
    """What a retrain's work folder meets when the incoming images change under the same class names:
    the trainer's producer names the inputs' sha256, so the old checkpoints are not continued."""
    import torch

    from promptcil.data import ImageSet

    from conftest import Interrupted, interrupt_after, make_params, train_run

    params = make_params(method={"name": "apt"}, train={"epochs": 2})
    other = ImageSet(digits_tasks.train.images.flip(-1), digits_tasks.train.labels, digits_tasks.train.class_names)
    changed = type(digits_tasks)(digits_tasks.split, other, digits_tasks.test)
    old = producer_record({"train": params.train.model_dump(mode="json")}, {"images": "old"})
    new = producer_record({"train": params.train.model_dump(mode="json")}, {"images": "new"})
    with pytest.raises(Interrupted):
        train_run(params, random_backbone, digits_tasks, tmp_path / "work", producer=old,
                  on_epoch_end=interrupt_after(2, 0))
    rerun = train_run(params, random_backbone, changed, tmp_path / "work", producer=new).trainable_state()
    clean = train_run(params, random_backbone, changed, tmp_path / "clean", producer=new).trainable_state()
    assert rerun.keys() == clean.keys() and all(torch.equal(rerun[k], clean[k]) for k in rerun)
