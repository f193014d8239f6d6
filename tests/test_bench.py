"""Smoke test of the speed harness (bench/speed.py --quick) on the CPU.

It checks that one run produces every section with sane numbers and prints the table of what it
saved. Timings are not asserted: a CPU says nothing about the device. FLOP counts are
deterministic, so the cost claims (APT costs the plain forward, the L2P-style pool about twice
it) are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from promptcil.prompts import METHODS

REPO = Path(__file__).resolve().parents[1]
SPEED = REPO / "bench" / "speed.py"
PIPELINE_PACKAGES = ("mlflow", "prefect", "dvc")  # absent on the device machine: the harness must not import them


def markdown(results: dict[str, Any]) -> str:
    """The harness's tables of a result (bench/harness/report.py): bench/ is a folder of scripts, not an
    installed package, so it goes on sys.path as it does for a script run from there."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    from harness.report import markdown as harness_markdown

    return harness_markdown(results)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    # one thread: steady on a shared 2-core machine (speed is not what this test checks)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(SPEED), "--quick", "--device", "cpu", "--no-compile",
         "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("speed-*-cpu-*.json")
    return json.loads(path.read_text()), done


def test_quick_run_has_every_section_with_sane_numbers(quick_run) -> None:
    results, _ = quick_run
    methods = [m for m in METHODS if m != "none"]
    assert results["meta"]["methods"] == methods and results["meta"]["device"] == "cpu"
    (model,) = results["models"].values()
    assert model["errors"] == {}
    assert set(model["inference"]) == {"plain", *methods}
    assert set(model["train"]) == {"limit", *methods}
    assert set(model["gflops"]) == {"plain", *methods}
    for rate in [*model["inference"].values(), *model["train"].values()]:
        assert rate["img_per_s"] > 0 and rate["ms_per_step"] > 0 and rate["first_call_s"] > 0
        assert rate["timed_steps"] == 4
    assert all(g > 0 for g in model["gflops"].values())
    assert model["features"]["img_per_s"] > 0 and model["features"]["loader_img_per_s"] > 0
    assert model["features"]["images"] == 3 * 4

    tasks = results["tasks"]
    assert set(tasks["runs"]) == {"2", "4"}
    for count, run in tasks["runs"].items():
        assert len(run["task_s"]) == int(count) and all(t > 0 for t in run["task_s"])
        assert run["median_s"] > 0 and run["growth"] > 0
    assert tasks["spread_across_runs"] >= 1

    targets = {(t["target"], t["model"]): t for t in results["targets"]}
    assert len(targets) == 8  # six per model, two for time per task
    memory = targets[("APT train step memory / limit", "vit_tiny_patch16_224")]
    assert memory["value"] is None and memory["pass"] is None  # no GPU memory counters on a CPU
    assert all(t["pass"] in (True, False) for t in results["targets"] if t is not memory)


def test_flop_counts_apt_like_plain_and_l2p_about_twice(quick_run) -> None:
    (model,) = quick_run[0]["models"].values()
    flops = model["gflops"]
    assert flops["apt"] / flops["plain"] <= 1.01  # an add on the CLS row, no extra token
    assert flops["l2p"] / flops["plain"] > 1.5  # a whole query pass before the prompted one


def test_printed_table_is_the_saved_result(quick_run) -> None:
    results, done = quick_run
    table = markdown(results)
    assert table in done.stdout
    assert "| plain forward (inference baseline) |" in table and "| time per task:" in table
    assert "PASS" in table


def test_result_names_the_code_that_ran(quick_run, tmp_path: Path) -> None:
    """meta.code is what `--code-digest` prints for this checkout, and changes with any library file."""
    results, _ = quick_run

    def digest(repo: Path) -> str:
        done = subprocess.run([sys.executable, str(repo / "bench" / "speed.py"), "--code-digest"],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    here = digest(REPO)
    assert results["meta"]["code"] == here and len(here) == 12
    assert f"code {results['meta']['code']}" in markdown(results)
    copy = tmp_path / "checkout"
    shutil.copytree(REPO / "bench", copy / "bench", ignore=shutil.ignore_patterns("results", "work", "__pycache__"))
    shutil.copytree(REPO / "src" / "promptcil", copy / "src" / "promptcil",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert digest(copy) == here  # paths are taken relative to the checkout
    with (copy / "src" / "promptcil" / "features.py").open("a") as handle:
        handle.write("\n# edited\n")
    assert digest(copy) != here


def test_the_harness_imports_no_pipeline_package(quick_run) -> None:
    """The device machine has torch and timm but not the pipeline's mlflow/prefect/dvc."""
    _, done = quick_run
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "promptcil.training" in imported and "promptcil.features" in imported
    assert not [m for m in imported if m.split(".")[0] in PIPELINE_PACKAGES]


def test_apt_profile_runs_both_steps_and_tables_their_operators(tmp_path: Path) -> None:
    """bench/profile_apt.py --quick: the CPU smoke run of the GPU profile (same steps as speed.py's)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "profile_apt.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("profile-apt-*.json")
    result = json.loads(path.read_text())
    for variant in ("limit", "apt"):
        assert result["rates"][variant]["img_per_s"] > 0
        operators = result["device_ms_per_step"][variant]["operator"]
        assert operators.get("aten::mm", 0) > 0  # profiled for real: every ViT step multiplies matrices
    assert "| operator | limit ms/step | APT ms/step | APT - limit |" in done.stdout
