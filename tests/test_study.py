"""The Prefect study flow (flows/study.py) over the one study runner (flows/study_runner.py): a grid of
pipeline runs, each in its own workspace, each a child run in MLflow; a grid run equals a plain pipeline
run of the same params, bit for bit; finished runs are not run again; a bad study file fails in one line
before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, load_flow, write_params

pytestmark = pytest.mark.slow


def write_spec(path, params_file, variants: dict, name: str = "tiny") -> None:
    path.write_text(yaml.safe_dump({
        "name": name,
        "protocols": {"tiny-digits": [str(params_file)]},
        "seeds": [0],
        "variants": variants,
        "columns": {"HM": "HM_avg"},
    }, sort_keys=False))


VARIANTS = {
    "APT": {},  # the tiny params' own method (APT, linear head): must equal the plain pipeline run
    "SimpleCIL": {"method": {"name": "none"}, "head": {"name": "prototype"}},
}


def test_study_flow_runs_the_grid_in_workers_and_tracks_every_run(
    prefect_harness, pipeline_project, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    params_dir = tmp_path / "protocol"
    params_dir.mkdir()
    write_params(params_dir)  # the same params as the conftest's plain pipeline run
    spec = tmp_path / "tiny.yaml"
    write_spec(spec, params_dir / "params.yaml", VARIANTS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    work, out = tmp_path / "work", tmp_path / "results"

    # A LocalCluster of one worker process: it gets this machine's CPU threads, as the plain run had, so the
    # comparison below can be bit for bit (float reductions, e.g. in the aligned head's training, are summed
    # in another order on another number of threads). Two workers: test_two_dask_workers_...
    study = load_flow("study").study
    result = study(str(spec), workers=1, work=str(work), out=str(out))

    rows = {row["variant"]: row for row in result["rows"]}
    assert sorted(rows) == ["APT", "SimpleCIL"]
    for variant, row in rows.items():
        folder = work / "tiny-digits" / "tiny" / variant / "seed0"
        metrics = json.loads((folder / "outputs" / "evaluate" / "metrics.json").read_text())
        assert row["accuracy_matrix"] == metrics["accuracy_matrix"]
        # a workspace on top of the protocol's shared one: it reads the backbone there, never copies it
        assert not (folder / "outputs" / "backbone").exists()
        assert (work / "tiny-digits" / "shared" / "outputs" / "backbone" / "backbone.json").is_file()
    # a grid run is a pipeline run: same params, same backbone, same numbers, bit for bit
    assert rows["APT"]["accuracy_matrix"] == pipeline_project["metrics"]["accuracy_matrix"]
    assert rows["SimpleCIL"]["trainable_params"] == 0
    assert rows["APT"]["trainable_params"] > 0

    # results on disk: the table names every variant; the JSON holds the rows
    table = (out / f"tiny-{result['meta']['date']}.md").read_text()
    assert "| tiny-digits | APT |" in table and "| tiny-digits | SimpleCIL |" in table and "HM" in table
    saved = json.loads((out / f"tiny-{result['meta']['date']}.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == [r["variant"] for r in result["rows"]]

    # MLflow: one parent run per invocation, a child per grid point with the run's own numbers
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("study-tiny")
    parent = client.get_run(result["meta"]["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "tiny.yaml", f"tiny-{result['meta']['date']}.md", f"tiny-{result['meta']['date']}.json"}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["variant"] for c in children) == ["APT", "SimpleCIL"]
    for child in children:
        row = rows[child.data.tags["variant"]]
        assert child.data.metrics["A_last"] == pytest.approx(row["A_last"])
        assert child.data.params["method.name"] == ("none" if row["variant"] == "SimpleCIL" else "apt")
        history = client.get_metric_history(child.info.run_id, "accuracy_seen_classes")
        assert [m.step for m in history] == list(range(len(row["accuracy_matrix"])))
        for key, name in (("base_after_task", "base_accuracy"), ("HM_after_task", "HM")):  # as pipeline runs log them
            logged = {m.step: m.value for m in client.get_metric_history(child.info.run_id, name)}
            expected = {t: v for t, v in enumerate(row[key]) if v is not None}
            assert expected and logged == pytest.approx(expected)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"params.yaml", "metrics.json"}

    # run again: nothing is retrained (result.json untouched), a second parent run logs the same rows
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("result.json")}
    checkpoints = {p: p.stat().st_mtime_ns for p in work.rglob("task_*.safetensors")}
    again = study(str(spec), workers=1, work=str(work), out=str(out))
    assert {p: p.stat().st_mtime_ns for p in work.rglob("result.json")} == stamps
    assert {p: p.stat().st_mtime_ns for p in work.rglob("task_*.safetensors")} == checkpoints
    assert [r["A_last"] for r in again["rows"]] == [r["A_last"] for r in result["rows"]]
    assert again["meta"]["mlflow_run_id"] != result["meta"]["mlflow_run_id"]

    # an edited variant is run again with its new params; the others are kept
    write_spec(spec, params_dir / "params.yaml", {**VARIANTS, "SimpleCIL": {**VARIANTS["SimpleCIL"],
                                                                           "eval": {"batch_size": 64}}})
    with pytest.raises(Exception, match="eval.batch_size"):  # read by the shared features stage: refused
        study(str(spec), workers=1, work=str(work), out=str(out))
    write_spec(spec, params_dir / "params.yaml", {**VARIANTS, "SimpleCIL": {**VARIANTS["SimpleCIL"],
                                                                           "train": {"epochs": 2}}})
    study(str(spec), workers=1, work=str(work), out=str(out))
    apt_result, simple_result = (work / "tiny-digits" / "tiny" / v / "seed0" / "result.json"
                                 for v in ("APT", "SimpleCIL"))
    assert apt_result.stat().st_mtime_ns == stamps[apt_result]
    assert simple_result.stat().st_mtime_ns != stamps[simple_result]
    assert yaml.safe_load((simple_result.parent / "params.yaml").read_text())["train"]["epochs"] == 2


def numbers(row: dict) -> dict:
    """A study row's results (not its timings, nor the worker that ran it)."""
    return {k: v for k, v in row.items() if "seconds" not in k and k != "worker"}


def test_two_dask_workers_give_the_one_worker_table_though_a_worker_dies(prefect_harness, tmp_path, monkeypatch):
    """The grid on a 2-worker LocalCluster, one worker killed (SIGKILL) while it trains: Dask reschedules the
    run it held, which resumes from its checkpoints; the table is the 1-worker table, bit for bit (the same
    torch threads per run), and the finished runs are not run again."""
    import threading

    import psutil

    params_dir = tmp_path / "protocol"
    params_dir.mkdir()
    write_params(params_dir, train={"epochs": 3})
    spec = tmp_path / "tiny.yaml"
    write_spec(spec, params_dir / "params.yaml", {"APT": {}, "VPT": {"method": {"name": "vpt"}}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = load_flow("study").study
    one = study(str(spec), workers=1, threads=1, work=str(tmp_path / "one"), out=str(tmp_path / "out1"))

    killed: list[int] = []

    def kill_a_worker_once_training_checkpointed() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if any((tmp_path / "two").rglob("ckpt-*.safetensors")):
                workers = [p for p in psutil.Process().children(recursive=True)
                           if "spawn_main" in " ".join(p.cmdline()) and p.is_running()]
                if workers:
                    workers[0].kill()
                    killed.append(workers[0].pid)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_worker_once_training_checkpointed, daemon=True)
    watcher.start()
    two = study(str(spec), workers=2, threads=1, work=str(tmp_path / "two"), out=str(tmp_path / "out2"))
    watcher.join()
    assert killed, "no worker was running a run to kill"
    assert [numbers(r) for r in two["rows"]] == [numbers(r) for r in one["rows"]]

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("result.json")}
    assert len(stamps) == 2
    again = study(str(spec), workers=2, threads=1, work=str(tmp_path / "two"), out=str(tmp_path / "out2"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("result.json")} == stamps
    assert [numbers(r) for r in again["rows"]] == [numbers(r) for r in two["rows"]]


def test_local_workers_report_to_the_flows_temporary_prefect_server(tmp_path):
    """From the command line with no Prefect server configured, the flow starts one temporary API and the two
    Dask workers report their task runs to it; a worker that started its own (Prefect's default when its
    environment names no API) delayed its first run (24 s on a GPU machine) and kept its runs out of the flow's
    sight."""
    import os

    params_dir = tmp_path / "protocol"
    params_dir.mkdir()
    write_params(params_dir)
    spec = tmp_path / "tiny.yaml"
    write_spec(spec, params_dir / "params.yaml", {"SimpleCIL": VARIANTS["SimpleCIL"]})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "flows.study", str(spec), "--workers", "2", "--seeds", "0", "1",
                           "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("Starting temporary server") == 1, log[-3000:]
    assert len(list((tmp_path / "work").rglob("result.json"))) == 2


def test_local_study_workers_start_with_the_runs_modules_imported(prefect_harness):
    """The workers the study starts import Prefect, torch, timm and the stages before their first task (a
    Dask preload): on 2 GPUs the worker that had not run the shared stages otherwise began its first run
    7 s late, inside the grid's span."""
    from distributed import Client, LocalCluster

    runner = load_flow("study").cluster_runner("local", 1, 1)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        imported = client.run(lambda: sorted(
            m for m in ("prefect", "flows.study", "timm", "stages.train", "stages.evaluate") if m in sys.modules))
    assert list(imported.values()) == [["flows.study", "prefect", "stages.evaluate", "stages.train", "timm"]]


def test_study_flow_refuses_a_bad_study_file_in_one_line_before_any_work(tmp_path):
    params_dir = tmp_path / "protocol"
    params_dir.mkdir()
    write_params(params_dir)
    work = tmp_path / "work"
    cases = {
        "unknown key": ({"name": "x", "protocols": {"p": [str(params_dir / "params.yaml")]}, "variants": {"a": {}},
                         "seed": [0]}, "seed: unknown key"),
        "bad override": ({"name": "x", "protocols": {"p": [str(params_dir / "params.yaml")]},
                          "variants": {"ok": {}, "typo": {"method": {"nmae": "apt"}}}},
                         "variant 'typo', seed 0: method.nmae"),
        "missing params file": ({"name": "x", "protocols": {"p": [str(tmp_path / "nope.yaml")]}, "variants": {"a": {}}},
                                "nope.yaml: file not found"),
        "no variants": ({"name": "x", "protocols": {"p": [str(params_dir / "params.yaml")]}, "variants": {}},
                        "variants"),
        "variant changes a shared stage": ({"name": "x", "protocols": {"p": [str(params_dir / "params.yaml")]},
                                            "variants": {"deeper": {"backbone": {"depth": 3}}}},
                                           "variant 'deeper' changes backbone.depth, which the shared stages"),
    }
    for case, (content, expected) in cases.items():
        spec = tmp_path / f"{case.replace(' ', '-')}.yaml"
        spec.write_text(yaml.safe_dump(content))
        done = subprocess.run([sys.executable, "-m", "flows.study", str(spec), "--work", str(work)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, (case, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, lines)
        assert not work.exists(), case  # nothing was started, nothing half-written
        assert not (tmp_path / "mlflow.db").exists(), case


def test_a_failing_run_is_reported_by_name_and_the_others_are_kept(prefect_harness, tmp_path, monkeypatch):
    """A run that fails while running (not a params error: SPT's k-means asks for more prompt tokens than
    the protocol's token sample holds) fails the flow at the end, naming the run; the other runs finish,
    are written to the results and tracked; the study's MLflow run is marked FAILED."""
    from mlflow import MlflowClient

    params_dir = tmp_path / "protocol"
    params_dir.mkdir()
    write_params(params_dir, init={"sample_images": 1})  # 16 tokens per block in the sample
    spec = tmp_path / "tiny.yaml"
    write_spec(spec, params_dir / "params.yaml", {
        "SimpleCIL": {"method": {"name": "none"}, "head": {"name": "prototype"}},
        "VPT-deep + SPT, 20 tokens": {"method": {"name": "vpt", "vpt": {"length": 20}}, "init": {"name": "spt"}},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    study = load_flow("study").study  # two Dask worker processes
    state = study(str(spec), workers=2, work=str(tmp_path / "work"), out=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "1 of 2 runs failed" in message and "VPT-deep + SPT, 20 tokens" in message
    saved = json.loads(next((tmp_path / "out").glob("tiny-*.json")).read_text())
    assert [r["variant"] for r in saved["rows"]] == ["SimpleCIL"]
    client = MlflowClient(uri)
    parent = client.get_run(saved["meta"]["mlflow_run_id"])
    assert parent.info.status == "FAILED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.tags["variant"] for c in children] == ["SimpleCIL"]


@pytest.mark.parametrize("spec_file", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_file_plans_without_running(spec_file, tmp_path):
    """The studies the docs report are study files the one runner plans: every protocol's params and every
    variant's overrides validate, and no variant changes what the shared stages read."""
    from flows.study_runner import plan
    from promptcil.config import load_study

    spec = load_study(spec_file)
    planned = plan(spec, None, None, tmp_path / "data", tmp_path / "work")
    assert planned.total == len(spec.protocols) * len(spec.variants) * len(spec.seeds)
    assert not (tmp_path / "work").exists()  # planning writes nothing
