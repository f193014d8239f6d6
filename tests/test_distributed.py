"""torchrun: a stage on 2 processes (gloo on the CPU) writes what it writes on one, within float tolerance.

Each stage is checked on the same inputs as the one-process run (the one-process run's upstream outputs
are copied in), so a difference points at that stage's split of the work, not at one upstream.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptcil.artifacts import load_tensors, read_json
from promptcil.distributed import samples_per_rank
from promptcil.workspace import STAGE_FOLDERS, Workspace
from stages import evaluate, train

from conftest import REPO, TINY_BACKBONE, project_params, run_stages_before_train, write_params

# float32 sums in another order (two shards, a gloo all-reduce) and nothing else
ATOL = 1e-4


def stage_command(stage: str, root: Path, *, torchrun: bool = False) -> list[str]:
    command = ["-m", f"stages.{stage}", "--root", str(root), "--no-progress"]
    if torchrun:  # what a user types: torchrun --standalone --nproc-per-node=2 -m stages.<stage>
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *command]
    return [sys.executable, *command]  # train.nproc: 2 makes the stage start torchrun itself (dvc.yaml's way)


def run_stage(stage: str, root: Path, *, torchrun: bool = False) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.run(stage_command(stage, root, torchrun=torchrun), cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def copy_outputs(source: Path, target: Path, *stages: str) -> None:
    for stage in stages:
        folder = target / "outputs" / STAGE_FOLDERS[stage]
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source / "outputs" / STAGE_FOLDERS[stage], folder)


def assert_tensors_close(one: Path, two: Path) -> None:
    a, _ = load_tensors(one)
    b, _ = load_tensors(two)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], atol=ATOL, rtol=1e-4, msg=f"{two.name}: {name}")
        else:
            assert torch.equal(a[name], b[name]), f"{two.name}: {name}"


def two_projects(tmp_path: Path, **overrides: dict) -> tuple[Path, Path]:
    """The same tiny params, on one process (run in this one) and on two (train.nproc: 2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    training = {"epochs": 2, "device": "cpu", **overrides.pop("train", {})}
    overrides.setdefault("backbone", {"pretrain": {"epochs": 3, "lr": 2e-3}})
    write_params(one, train=training, **overrides)
    write_params(two, train={**training, "nproc": 2}, **overrides)
    run_stages_before_train(one)
    params, workspace = project_params(one), Workspace(one)
    train.run(params, workspace, progress=False)
    evaluate.run(params, workspace, progress=False)
    return one, two


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> tuple[Path, Path]:
    return two_projects(tmp_path_factory.mktemp("distributed"))


def test_pretrain_on_two_processes_trains_the_one_process_backbone(projects):
    """Compared by what the backbone computes: AdamW turns the float noise of a gradient that is zero in exact
    arithmetic (the attention keys' bias: softmax ignores it) into lr-sized steps, in one process as in two."""
    from promptcil.backbone import load_recorded_backbone
    from promptcil.data import DevicePreprocess, read_image_set

    one, two = projects
    copy_outputs(one, two, "prepare")
    done = run_stage("pretrain", two)
    assert done.returncode == 0, done.stderr
    record, reference = (read_json(p / "outputs/backbone/backbone.json") for p in (two, one))
    assert record["world_size"] == 2 and reference["world_size"] == 1
    assert sum(record["samples_per_rank"]) == reference["samples_per_rank"][0] == record["train_images"]
    assert record["epoch_losses"] == pytest.approx(reference["epoch_losses"], abs=ATOL)
    assert len(record["epoch_seconds"]) == len(record["epoch_losses"]) and min(record["epoch_seconds"]) > 0
    assert sum(record["epoch_seconds"]) <= record["seconds"]
    cfg = project_params(one).backbone
    images = read_image_set(one / "outputs/prepare", "test").images[:64]
    features = []
    for project in (one, two):
        backbone = load_recorded_backbone(cfg, project / "outputs/backbone")
        with torch.no_grad():
            features.append(backbone.forward_features(DevicePreprocess.from_model(backbone)(images)))
    torch.testing.assert_close(features[1], features[0], atol=1e-3, rtol=1e-3)


def test_a_compiled_pretraining_on_two_processes_takes_its_graph_from_the_cache_the_second_time(
        tmp_path, monkeypatch):
    """backbone.pretrain.compile under torchrun: the ViT is compiled as one graph inside DDP. Compiling the DDP model
    made Dynamo split it at DDP's gradient buckets (this ViT's 7 MB of weights: two parts), and AOTAutograd's cache
    refuses split graphs, so every run compiled them again (~30 s of ViT-B on two H200s: docs/scaling.md)."""
    from stages import prepare

    write_params(tmp_path, backbone={**TINY_BACKBONE, "embed_dim": 192, "source": "pretrain",
                                     "pretrain": {"epochs": 2, "lr": 2e-3, "compile": True}},
                 train={"device": "cpu", "nproc": 2})
    prepare.run(project_params(tmp_path), Workspace(tmp_path), progress=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    records = []
    for _ in range(2):
        done = run_stage("pretrain", tmp_path)
        assert done.returncode == 0, done.stderr
        records.append(read_json(tmp_path / "outputs/backbone/backbone.json"))
    first, second = records
    assert first["compiled"] and first["world_size"] == 2
    assert first["compile_cache"] == {"hit": 0, "miss": 1, "bypass": 0}  # one graph, compiled and kept
    assert second["compile_cache"] == {"hit": 1, "miss": 0, "bypass": 0}  # taken from the cache
    assert second["epoch_losses"] == first["epoch_losses"]


def test_features_under_torchrun_gather_every_rank_in_data_order(projects):
    one, two = projects
    copy_outputs(one, two, "prepare", "pretrain")
    done = run_stage("features", two, torchrun=True)
    assert done.returncode == 0, done.stderr
    for name in ("features.safetensors", "token_sample.safetensors"):  # the sample: each rank a shard, rank 0 all
        assert_tensors_close(one / "outputs/features" / name, two / "outputs/features" / name)
    record = read_json(two / "outputs/features/features_log.json")
    assert record["world_size"] == 2 and sum(record["samples_per_rank"]) == record["samples"]
    assert max(record["samples_per_rank"]) - min(record["samples_per_rank"]) <= 1


def test_train_on_two_processes_ends_with_the_one_process_prompts_and_heads(projects):
    one, two = projects
    copy_outputs(one, two, "prepare", "pretrain", "features", "prototypes", "prompt_init")
    done = run_stage("train", two)
    assert done.returncode == 0, done.stderr
    tasks = project_params(one).data
    states = sorted((one / "outputs/train").glob("task_*.safetensors"))
    assert len(states) == 1 + (10 - tasks.base_classes) // tasks.classes_per_task
    for state in states:
        assert_tensors_close(state, two / "outputs/train" / state.name)
    log, reference = read_json(two / "outputs/train/train_log.json"), read_json(one / "outputs/train/train_log.json")
    assert log["world_size"] == 2
    batch = project_params(two).train.batch_size
    for task, task_ref in zip(log["log"], reference["log"]):
        assert task["samples_per_rank"] == samples_per_rank(task["samples"], batch, 2)
        assert sum(task["samples_per_rank"]) == task_ref["samples"] == task["samples"]
        assert task["epoch_losses"] == pytest.approx(task_ref["epoch_losses"], abs=ATOL)


def test_evaluate_on_two_processes_reports_the_one_process_metrics(projects):
    one, two = projects
    copy_outputs(one, two, "prepare", "pretrain", "train")
    done = run_stage("evaluate", two)
    assert done.returncode == 0, done.stderr
    metrics, reference = (read_json(p / "outputs/evaluate/metrics.json") for p in (two, one))
    assert metrics["accuracy_matrix"] == reference["accuracy_matrix"]  # the same predictions, gathered
    assert metrics["A_last"] == reference["A_last"]
    assert metrics["A_joint"] == pytest.approx(reference["A_joint"], abs=0.01)  # a head refitted on gathered rows
    split = read_json(two / "outputs/evaluate/evaluate.json")
    assert split["world_size"] == 2 and sum(split["test_samples_per_rank"]) == sum(metrics["test_samples_per_task"])


def test_the_ridge_heads_sums_are_reduced_across_ranks(tmp_path):
    """A closed-form head: its Gram matrix and targets summed over both ranks' rows (no gradient); with
    augmentation, each rank crops its rows of the global batch's draws."""
    augment = {"crop_scale": [0.5, 1.0], "flip": True}
    one, two = two_projects(tmp_path, head={"name": "ridge"}, train={"epochs": 1, "augment": augment})
    copy_outputs(one, two, "prepare", "pretrain", "features", "prototypes", "prompt_init")
    done = run_stage("train", two)
    assert done.returncode == 0, done.stderr
    last = sorted((one / "outputs/train").glob("task_*.safetensors"))[-1]
    assert_tensors_close(last, two / "outputs/train" / last.name)


def test_a_failing_rank_stops_the_stage_with_its_one_line_error_and_writes_nothing(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, train={"device": "cpu", "nproc": 2}, data={"source": "imagefolder", "root": "missing"})
    (project / "outputs/prepare").mkdir(parents=True)  # the prepared data is not there: every rank stops
    done = run_stage("train", project)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 4, done.stderr
    assert len(errors) == 1 and "outputs/prepare" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "outputs/train").exists() or not any((project / "outputs/train").iterdir())


def test_the_prefect_pipeline_runs_the_compute_stages_on_two_processes(prefect_harness, tmp_path, monkeypatch):
    """train.nproc: 2 in the flow: each compute stage's task starts torchrun and returns what its record says."""
    from conftest import load_flow

    project = tmp_path / "flow"
    project.mkdir()
    write_params(project, train={"epochs": 1, "device": "cpu", "nproc": 2},
                 backbone={"pretrain": {"epochs": 2, "lr": 2e-3}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    state = load_flow("pipeline").pipeline(str(project), progress=False, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    outputs = project / "outputs"
    assert result["metrics"] == read_json(outputs / "evaluate/metrics.json")
    for record in ("backbone/backbone.json", "features/features_log.json", "train/train_log.json",
                   "evaluate/evaluate.json"):
        assert read_json(outputs / record)["world_size"] == 2, record
    assert result["registration"]["version"] == "1"
