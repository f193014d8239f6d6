"""The DVC pipeline for real: `dvc repro`, caching, partial reruns and push/clone/pull, in a temporary
git repository holding exactly the project's tracked files (dvc.yaml, stages/, src/, .dvc/config)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from promptcil.config import load_params

from conftest import REPO, write_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "pretrain", "features", "prototypes", "prompt_init", "train", "evaluate", "register"]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "promptcil-tests", "GIT_AUTHOR_EMAIL": "tests@promptcil.invalid",
    "GIT_COMMITTER_NAME": "promptcil-tests", "GIT_COMMITTER_EMAIL": "tests@promptcil.invalid",
}


class Repo:
    """A temporary project checkout with its own DVC remote and MLflow store; runs git and dvc in it."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "repo"
        self.remote = root / "remote"
        venv_bin = str(Path(sys.executable).parent)  # `python -m stages.x` in dvc.yaml must be the venv's
        self.env = os.environ | GIT_IDENTITY | {
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(self.dir / "src"),  # the copy's library (the one DVC hashes), not the editable install
        }
        self.dvc_exe = str(Path(venv_bin) / "dvc")

    def run(self, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(args, cwd=cwd or self.dir, env=self.env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
        return output

    def dvc(self, *args: str, cwd: Path | None = None) -> str:
        return self.run(self.dvc_exe, *args, cwd=cwd)

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return self.run("git", *args, cwd=cwd)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty", "-m", message)


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def skipped(output: str) -> list[str]:
    return re.findall(r"Stage '(\w+)' didn't change, skipping", output)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_states(project: Path) -> list[Path]:
    return sorted((project / "outputs" / "train").glob("task_*.safetensors"))


def payload_hashes(project: Path) -> dict[str, str]:
    """sha256 of every tensor file the pipeline wrote, by path relative to outputs/."""
    outputs = project / "outputs"
    return {str(p.relative_to(outputs)): sha256(p) for p in sorted(outputs.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """The project's tracked files in a fresh git repo, the tiny params committed, DVC's remote in tmp,
    and one full `dvc repro` (committed, like a user would)."""
    r = Repo(tmp_path_factory.mktemp("dvc"))
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (r.dir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, r.dir / name)
    assert (r.dir / "dvc.yaml").is_file() and (r.dir / ".dvc" / "config").is_file()
    write_params(r.dir)
    r.git("init", "-q")
    r.commit("project files, tiny params")
    r.dvc("remote", "modify", "--local", "local", "url", str(r.remote))
    r.first_repro = r.dvc("repro")
    r.status_after_repro = r.git("status", "--porcelain", "--untracked-files=all")
    r.first_payloads = payload_hashes(r.dir)
    r.first_metrics = (r.dir / "outputs" / "evaluate" / "metrics.json").read_bytes()
    r.commit("first run")
    return r


def test_repro_runs_every_stage_and_writes_metrics(repo: Repo):
    assert ran(repo.first_repro) == STAGES
    metrics = json.loads((repo.dir / "outputs" / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["A_last"] <= 1.0
    assert len(metrics["accuracy_matrix"]) == 4  # digits: B4 + 3 tasks of 2
    assert metrics["base_after_task"] == metrics["accuracy_after_task"]
    assert metrics["next_task_class_mean_after_task"][-1] is None and all(
        0 <= n <= 1 for n in metrics["next_task_class_mean_after_task"][:-1])
    assert len(task_states(repo.dir)) == 4
    registration = json.loads((repo.dir / "outputs" / "register" / "registration.json").read_text())
    assert registration["version"] == "1"
    assert (repo.dir / "dvc.lock").is_file()
    # the MLflow run records which DVC data version it trained on
    lock = yaml.safe_load((repo.dir / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    run = mlflow.MlflowClient(repo.env["MLFLOW_TRACKING_URI"]).get_run(registration["run_id"])
    assert run.data.tags["dvc_data_md5"] == prepared_md5
    # git sees only the lock file change: every output is DVC's (cached, git-ignored) or ignored by the project
    assert [line[3:] for line in repo.status_after_repro.splitlines()] == ["dvc.lock"]


def test_repro_matches_the_stage_functions_bit_for_bit(repo: Repo, pipeline_project):
    """DVC runs each stage as `python -m stages.x` in its own process; calling the same functions in one
    process (conftest's run_stages, also what the Prefect flow does) gives the same bytes."""
    assert load_params(repo.dir / "params.yaml") == load_params(pipeline_project["dir"] / "params.yaml")
    assert repo.first_payloads == payload_hashes(pipeline_project["dir"])
    assert repo.first_metrics == (pipeline_project["dir"] / "outputs" / "evaluate" / "metrics.json").read_bytes()


def test_second_repro_is_a_no_op(repo: Repo):
    before = {p.name: sha256(p) for p in task_states(repo.dir)}
    output = repo.dvc("repro")
    assert ran(output) == []
    assert skipped(output) == STAGES
    assert "Data and pipelines are up to date" in output
    assert json.loads(repo.dvc("status", "--json")) == {}
    assert {p.name: sha256(p) for p in task_states(repo.dir)} == before


def test_changing_a_train_param_reruns_train_and_downstream_only(repo: Repo):
    upstream = ["prepare", "pretrain", "features", "prototypes", "prompt_init"]
    outputs = repo.dir / "outputs"
    upstream_files = {p: sha256(p) for p in sorted(outputs.rglob("*")) if p.is_file()
                      and p.relative_to(outputs).parts[0] in {"prepare", "backbone", "features", "prototypes",
                                                              "prompt_init"}}
    old_log = json.loads((outputs / "train" / "train_log.json").read_text())
    raw = yaml.safe_load((repo.dir / "params.yaml").read_text())
    assert raw["train"]["epochs"] == 1
    raw["train"]["epochs"] = 2
    (repo.dir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    status = json.loads(repo.dvc("status", "--json"))
    assert set(status) == {"train"}  # the only stage whose own deps changed
    output = repo.dvc("repro")
    assert ran(output) == ["train", "evaluate", "register"]
    assert skipped(output) == upstream
    repo.commit("two epochs")

    new_log = json.loads((outputs / "train" / "train_log.json").read_text())
    assert [len(t["epoch_losses"]) for t in old_log["log"]] == [1, 1, 1, 1]
    assert [len(t["epoch_losses"]) for t in new_log["log"]] == [2, 2, 2, 2]
    assert {p: sha256(p) for p in upstream_files} == upstream_files  # upstream outputs untouched
    registration = json.loads((outputs / "register" / "registration.json").read_text())
    assert registration["version"] == "2"  # a new candidate in the same MLflow registry
    assert json.loads(repo.dvc("status", "--json")) == {}


def test_push_clone_pull_restores_identical_artifacts(repo: Repo, tmp_path: Path):
    repo.dvc("push")
    assert any(repo.remote.rglob("*")), "dvc push wrote nothing to the remote"
    clone = tmp_path / "clone"
    repo.git("clone", "-q", str(repo.dir), str(clone), cwd=tmp_path)
    assert not (clone / "outputs").exists()
    # `dvc remote modify --local` lives in .dvc/config.local, which git does not carry into a clone.
    repo.dvc("remote", "modify", "--local", "local", "url", str(repo.remote), cwd=clone)
    repo.dvc("pull", cwd=clone)

    original, pulled = task_states(repo.dir), task_states(clone)
    assert [p.name for p in pulled] == [p.name for p in original] == [f"task_{t:02d}.safetensors" for t in range(4)]
    assert [sha256(p) for p in pulled] == [sha256(p) for p in original]
    manifests = [json.loads(p.with_suffix(".json").read_text())["sha256"] for p in pulled]
    assert manifests == [sha256(p) for p in pulled]
    for name in ("metrics.json", "plots/accuracy_matrix.json"):
        assert sha256(clone / "outputs" / "evaluate" / name) == sha256(repo.dir / "outputs" / "evaluate" / name)
    # The clone is a complete, up-to-date checkout of the run: nothing to reproduce.
    assert json.loads(repo.dvc("status", "--json", cwd=clone)) == {}


def test_dvc_yaml_code_deps_are_each_stage_import_closure():
    """Every project file a stage's command imports (directly, inside functions, through other modules, or
    through a registry's discovery) is a dep of that stage, and no code dep is one it does not import."""
    from dvc_deps import check

    problems = {stage: found for stage, found in check().items() if found["missing"] or found["superfluous"]}
    assert not problems, f"dvc.yaml's code deps differ from the imports ({problems}): python tests/dvc_deps.py --write"


def test_a_stage_depends_on_the_modules_a_package_imports_lazily_by_name():
    """promptcil.tracking imports its modules on first use (`import_module(f"promptcil.tracking.{name}")`): the
    register stage, which logs and registers through them, must rerun when runs.py or registry.py change."""
    from dvc_deps import REPO, closure

    register = closure("stages.register")
    assert {REPO / "src/promptcil/tracking" / name for name in ("runs.py", "registry.py", "metrics.py")} <= register


def test_a_fresh_clone_has_no_changed_dependency(tmp_path):
    """The committed dvc.lock matches the committed code and params.yaml: a fresh clone's `dvc status`
    reports its outputs missing (they live in the cache and remotes), never a changed dependency."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True)
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    status = subprocess.run([dvc, "status", "--json"], cwd=clone, env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    changed = {}  # code or params that differ from the lock (an upstream output is merely absent: "deleted")
    for stage, entries in json.loads(status.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            deps = {dep: state for dep, state in entry.get("changed deps", {}).items() if state != "deleted"}
            if deps or entry.get("changed params"):
                changed[stage] = {"deps": deps, "params": entry.get("changed params")}
    assert not changed, f"dvc.lock is stale for {changed}: run `make lock` and commit dvc.lock"
