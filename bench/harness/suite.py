"""The whole run: each model's section, the time per task, torch.compile last; the result saved after each."""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from harness.inputs import Run
from harness.provenance import meta
from harness.report import markdown, result_path, write_result
from harness.sections import bench_compiled, bench_model
from harness.targets import targets
from harness.time_per_task import bench_tasks


def run_suite(run: Run, *, models: list[str], features_batches: int, task_model: str, tasks: list[int],
              images_per_task: int, compiled: bool, quick: bool, out: Path, started: float) -> dict[str, Any]:
    """Measure every section in order into speed-<date>-<device>.json in `out`, then print the tables.

    `started` is the perf_counter() the run's wall time counts from."""
    now = datetime.now(timezone.utc)
    results: dict[str, Any] = {"meta": meta(run, now, compiled=compiled, quick=quick),
                               "models": {}, "tasks": {}, "targets": []}
    name = results["meta"]["device_name"]
    out.mkdir(parents=True, exist_ok=True)
    path = result_path(out, now, name)

    def save(section: str, section_start: float) -> None:
        """Write what is measured so far (a run cut short keeps it) and say how long the section took."""
        now = time.perf_counter()
        results["meta"]["wall_s"] = now - started
        results["targets"] = targets(results)
        write_result(path, results)
        print(f"[{section}: {now - section_start:.0f} s, {now - started:.0f} s in all]", flush=True)

    print(f"{name}, torch {torch.__version__}: writing {path}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            section_start = time.perf_counter()
            results["models"][model] = bench_model(run, model, features_batches, Path(scratch))
            save(model, section_start)
        if tasks:
            section_start = time.perf_counter()
            try:
                results["tasks"] = bench_tasks(run, task_model, tasks, images_per_task, Path(scratch))
            except Exception as err:  # noqa: BLE001  (keep the rest of the device run)
                results["tasks"] = {"model": task_model, "error": f"{type(err).__name__}: {err}"}
            save("time per task", section_start)
        if compiled:  # last: the slowest section (compilation), and the least needed if the run is cut short
            model = models[0]
            section_start = time.perf_counter()
            bench_compiled(run, model, Path(scratch), results["models"][model])
            save(f"{model} compiled", section_start)
    print()
    print(markdown(results))
    print(f"\n{path} ({results['meta']['wall_s']:.0f} s)", flush=True)
    return results
