"""Crashes for real: a train stage and a retrain flow SIGKILLed mid-run in their own processes.

No mocks: the child is `python -m stages.train` / `python -m flows.retrain` as DVC and a scheduler
start them, killed with SIGKILL (no handler runs, nothing is flushed) the moment a committed
checkpoint shows up on disk. Then: nothing half-written is visible, the registry and the
champion are untouched, and a rerun resumes and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from promptcil import tracking
from promptcil.artifacts import ArtifactError, load_tensors, manifest_path, sha256_file
from promptcil.config import load_params
from promptcil.provenance import RECORD_FILE

from conftest import run_stages, run_stages_before_train, write_params

pytestmark = pytest.mark.slow

CHECKPOINT = re.compile(r"ckpt-t(\d+)-e(\d+)\.json$")
# Few epochs of everything: the backbone's quality does not matter here, the kill window does.
# 4 epochs a task leave ~10 epochs (a second or more on CPU) between the first task-1 checkpoint
# and the end of training, against a 5 ms poll.
FAST_BACKBONE = {"pretrain": {"epochs": 1, "lr": 2e-3}}
EPOCHS = 4


# ---------------------------------------------------------------- child processes
def child_env(**extra: str) -> dict[str, str]:
    """The test's environment, with this venv's bin first on PATH (stages and flows are installed packages)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env | extra


class Child:
    """A command in its own session (process group), output to a file; always killed as a group."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def exited(self) -> bool:
        """Whether the leader exited, without reaping it: while it is an unreaped zombie its pid (the
        group id) cannot be reused, so killing the group afterwards can only hit our own children."""
        return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def kill(self) -> int:
        """SIGKILL the whole group (the flow may have started a Prefect server child), then reap."""
        if self.proc.returncode is None:  # not reaped yet, so the group id is still ours
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = self.proc.wait()
        self._out.close()
        return code

    def wait(self, timeout: float) -> int:
        """Run to completion (the group's leftovers are killed after the leader exits)."""
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.proc.args} ran over {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)
        return self.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextmanager
def child(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Child]:
    c = Child(args, cwd, env, log)
    try:
        yield c
    finally:
        c.kill()


def poll(found: Callable[[], object], c: Child, timeout: float, interval: float = 0.005) -> object:
    """Poll `found()` until it returns something truthy; fail if the child exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        if c.exited():
            pytest.fail(f"{c.proc.args} exited before the kill point (raise train.epochs?):\n{c.tail()}")
        time.sleep(interval)
    pytest.fail(f"no kill point within {timeout:.0f} s:\n{c.tail()}")


def committed_checkpoints(folder: Path) -> list[tuple[int, int, str]]:
    """(task, epoch, name) of checkpoints whose manifest (the commit point) exists."""
    found = []
    for p in folder.glob("ckpt-*.json"):
        if m := CHECKPOINT.search(p.name):
            found.append((int(m[1]), int(m[2]), p.name))
    return sorted(found)


def assert_nothing_partial(folder: Path) -> dict[str, str]:
    """Every committed artifact under `folder` loads and verifies; a payload without a manifest is an
    uncommitted write that loading refuses; anything else is a temporary file of an atomic write.
    Returns the kind of every committed artifact by its path relative to `folder`."""
    committed: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            if manifest_path(path).exists():
                _, manifest = load_tensors(path)
                committed[rel] = manifest["kind"]
            else:
                with pytest.raises(ArtifactError, match="no manifest"):
                    load_tensors(path)
        elif path.suffix == ".json":
            if path.name in ("train_log.json", RECORD_FILE):  # plain JSON, written atomically
                json.loads(path.read_text())
            else:  # a manifest never outlives (or precedes) its payload
                assert path.with_suffix(".safetensors").exists(), f"{rel}: a manifest without its payload"
        else:
            assert path.name.startswith(".") and path.name.endswith(".tmp"), f"{rel}: neither artifact nor temp file"
    return committed


def identity(path: Path) -> tuple[int, int]:
    """(inode, mtime_ns): an atomic rewrite replaces the inode even when the bytes come out equal."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def tree_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


# ---------------------------------------------------------------- 1. train stage killed mid-run
def task_manifests(train_dir: Path) -> dict[str, dict]:
    """Task-state manifests without the wall-clock seconds, the one field two runs cannot share."""
    manifests = {p.name: json.loads(p.read_text()) for p in sorted(train_dir.glob("task_*.json"))}
    for manifest in manifests.values():
        assert manifest["metadata"].pop("seconds") > 0
    return manifests


def without_seconds(train_log: Path) -> dict:
    """The log without what this process did rather than what the run computed: seconds (a task's, and its
    ending's), and the images it forwarded (a resumed process forwards only what was left)."""
    log = json.loads(train_log.read_text())
    assert log.pop("images_forwarded") > 0
    for task in log["log"]:
        assert task.pop("seconds") > 0 and task.pop("end_seconds") >= 0
    return log


def test_train_stage_killed_mid_run_resumes_to_identical_task_states(tmp_path):
    stage = [sys.executable, "-m", "stages.train"]
    env = child_env()
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    for project in (killed, reference):
        project.mkdir()
        write_params(project, backbone=FAST_BACKBONE, train={"epochs": EPOCHS})
        run_stages_before_train(project)
    for upstream in ("backbone/weights.json", "prompt_init/prompt.json"):  # same inputs, or comparing means nothing
        assert (killed / "outputs" / upstream).read_bytes() == (reference / "outputs" / upstream).read_bytes()

    train_dir = killed / "outputs" / "train"
    with child(stage, killed, env, tmp_path / "killed.log") as c:
        seen = poll(lambda: [x for x in committed_checkpoints(train_dir / "checkpoints") if x[0] >= 1], c, timeout=120)
        assert c.kill() == -signal.SIGKILL
    num_tasks = json.loads((killed / "outputs" / "prepare" / "tasks.json").read_text())["num_tasks"]
    assert not (train_dir / f"task_{num_tasks - 1:02d}.json").exists(), f"training ended before the kill ({seen})"
    assert not (train_dir / "train_log.json").exists()

    committed = assert_nothing_partial(train_dir)
    assert committed.get("task_00.safetensors") == "task_state", committed
    # the newest committed checkpoint (the old one may still be there: the kill can land before its removal)
    assert sum(kind == "checkpoint" for kind in committed.values()) >= 1, committed
    task0 = {p: identity(train_dir / p) for p in ("task_00.safetensors", "task_00.json")}

    with child(stage, killed, env, tmp_path / "resumed.log") as c:
        assert c.wait(timeout=300) == 0, c.tail()
    with child(stage, reference, env, tmp_path / "reference.log") as c:
        assert c.wait(timeout=300) == 0, c.tail()

    # the resumed run started from the checkpoint: task 0's committed state was not written again
    assert {p: identity(train_dir / p) for p in task0} == task0
    resumed, uninterrupted = task_manifests(train_dir), task_manifests(reference / "outputs" / "train")
    assert len(resumed) == num_tasks
    assert {n: m["sha256"] for n, m in resumed.items()} == {n: m["sha256"] for n, m in uninterrupted.items()}
    assert resumed == uninterrupted  # metadata too: epoch losses carried through the checkpoint
    # every task in the log (register logs one MLflow run per task from it), not only those trained after the kill
    assert without_seconds(train_dir / "train_log.json") == without_seconds(reference / "outputs/train/train_log.json")
    assert assert_nothing_partial(train_dir) == assert_nothing_partial(reference / "outputs" / "train")


# ---------------------------------------------------------------- 2. retrain flow killed mid-run
FASHION = Path("/usr/share/datasets/fashion-mnist")


def model_files(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    """sha256 of every file of a registered version's logged model."""
    source = client.get_model_version(name, version).source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    folder = Path(location.removeprefix("file://"))
    assert folder.is_dir(), location
    return tree_hashes(folder)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_retrain_flow_killed_mid_run_leaves_champion_and_resumes(tmp_path, monkeypatch, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from test_retrain import write_new_class

    project = tmp_path / "project"
    project.mkdir()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_params(project, backbone=FAST_BACKBONE, train={"epochs": EPOCHS})
    first = run_stages(project)["registration"]
    tracking.configure()
    tracking.approve("promptcil", first["version"], reviewer="test")
    # two new classes, 180 training images each: enough epochs of real work to be killed in
    for label, name in ((7, "sneaker"), (8, "bag")):
        write_new_class(project / "incoming" / name, fashion_label=label, count=240, tmp=tmp_path)

    client = MlflowClient(uri, uri)
    champion_before = tracking.champion("promptcil")
    files_before = model_files(client, "promptcil", "1")
    outputs_before = tree_hashes(project / "outputs", skip=("retrain",))
    work = project / load_params(project / "params.yaml").retrain.work_dir
    flow = [sys.executable, "-m", "flows.retrain"]
    env = child_env(MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=str(PREFECT_API_URL.value()),
                    PREFECT_HOME=str(tmp_path / "prefect-home"))

    def checkpoint_in_run_dir():
        return [(d, x) for d in work.glob("v1-*") for x in committed_checkpoints(d / "checkpoints")]

    with child(flow, project, env, tmp_path / "killed.log") as c:
        (run_dir, _), *_ = poll(checkpoint_in_run_dir, c, timeout=180)
        assert c.kill() == -signal.SIGKILL
    task, epoch, name = committed_checkpoints(run_dir / "checkpoints")[-1]  # where a resume starts
    assert not (run_dir / f"task_{task:02d}.json").exists(), f"the new task finished before the kill ({name})"

    # the crash changed nothing a reader of the registry or the pipeline sees
    assert tracking.champion("promptcil") == champion_before
    assert [str(v.version) for v in client.search_model_versions("name='promptcil'")] == ["1"]
    assert model_files(client, "promptcil", "1") == files_before
    assert tree_hashes(project / "outputs", skip=("retrain",)) == outputs_before
    committed = assert_nothing_partial(run_dir)
    assert {k for p, k in committed.items() if p.startswith("checkpoints/")} == {"checkpoint"}, committed
    killed_at = (epoch, identity(run_dir / "checkpoints" / name))

    # rerun to completion, watching its checkpoints: a resumed run never rewrites epoch <= the killed one
    written: set[tuple[int, tuple[int, int] | None]] = set()

    def watch() -> None:
        for p in (run_dir / "checkpoints").glob("ckpt-*.json"):
            if (m := CHECKPOINT.search(p.name)) and int(m[1]) == task:
                try:
                    written.add((int(m[2]), identity(p)))
                except FileNotFoundError:
                    pass

    with child(flow, project, env, tmp_path / "resumed.log") as c:
        deadline = time.monotonic() + 300
        while not c.exited():
            assert time.monotonic() < deadline, f"retrain ran over 300 s:\n{c.tail()}"
            watch()
            time.sleep(0.005)
        assert c.kill() == 0, c.tail()
    assert "'status': 'registered'" in c.tail(), c.tail()
    assert all(e > killed_at[0] or (e, ident) == killed_at for e, ident in written), (killed_at, written)
    assert [d.name for d in work.glob("v1-*")] == [run_dir.name]  # the same run folder, picked up again
    assert [x[:2] for x in committed_checkpoints(run_dir / "checkpoints")] == [(task, EPOCHS)]

    versions = {str(v.version): v for v in client.search_model_versions("name='promptcil'")}
    assert sorted(versions) == ["1", "2"]
    assert versions["2"].tags["review"] == "pending"
    assert str(client.get_model_version_by_alias("promptcil", "champion").version) == "1"
    assert model_files(client, "promptcil", "1") == files_before
    _, manifest = load_tensors(run_dir / f"task_{task:02d}.safetensors", kind="task_state")
    assert len(manifest["metadata"]["epoch_losses"]) == EPOCHS
    assert manifest["metadata"]["train_samples"] == 360 and manifest["metadata"]["classes_seen"] == 12
