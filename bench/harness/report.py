"""The result's markdown tables (what `--table` prints) and its JSON file."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.targets import flops_ratio, ratio


def result_path(out: Path, now: datetime, device_name: str) -> Path:
    """speed-<date>-<device>.json in `out`."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return out / f"speed-{now:%Y%m%d-%H%M%S}-{slug}.json"


def write_result(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2))


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"### {meta['device_name']} · torch {meta['torch']} · timm {meta['timm']} · {meta['date']}"
        + (f" · commit {meta['commit']}" if meta.get("commit") else "")
        + (f" · code {meta['code']}" if meta.get("code") else ""),
        "",
        f"batch {meta['batch_size']}, {meta['dtype']}, {meta['timed_steps']} timed steps after {meta['warmup']} "
        f"warm-up (median of {meta['repeats']} groups; spread = (slowest - fastest group) / median); "
        "random weights and images",
        "",
        "| model | row | img/s | × baseline | spread | ms/step | step MiB | peak MiB | GFLOPs/img | × plain GFLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        inf, tr, fl = m["inference"], m["train"], m["gflops"]
        plain, limit = inf.get("plain", {}), tr.get("limit", {})

        def row(label: str, r: dict[str, Any], base: dict[str, Any], flops: str = "") -> None:
            spread = f"{r['spread']:.0%}" if "spread" in r else ""
            lines.append(
                f"| {name} | {label} | {fmt(r.get('img_per_s'), 0)} | {fmt(ratio(r, base, 'img_per_s'))} | {spread} | "
                f"{fmt(r.get('ms_per_step'), 1)} | {fmt(r.get('step_mib'), 0)} | {fmt(r.get('peak_mib'), 0)} | "
                f"{fmt(fl.get(flops))} | {fmt(flops_ratio(fl, flops))} |"
            )

        row("plain forward (inference baseline)", plain, plain, "plain")
        row("fwd+bwd limit (training baseline)", limit, limit)
        for method in (k for k in tr if k != "limit"):
            row(f"{method} train step (× limit)", tr[method], limit)
            row(f"{method} inference (× plain)", inf.get(method, {}), plain, method)
        if "features" in m:
            f = m["features"]
            row("features stage, uint8 host → device (× plain)", f, plain)
            row("loader alone: gather, pin, copy (× plain)", {"img_per_s": f["loader_img_per_s"]}, plain)
            for key, label in (("loader_fed_forward", "plain forward fed by the loader"),
                               ("with_block_means", "… + per-block token means (on device)"),
                               ("device_outputs", "… + results kept on device, one copy to host"),
                               ("short_pass", "features stage, a quarter of the batches")):
                if key in f.get("breakdown", {}):
                    row(f"{label} (× plain)", {"img_per_s": f["breakdown"][key]}, plain)
        for variant, c in m.get("compiled", {}).items():
            eager_train, eager_inf = tr.get(variant, {}), inf.get(variant, {})
            if "train" in c:
                row(f"{variant} train step, compiled (× eager; {c['train']['graphs']} graphs, "
                    f"first call {c['train']['first_call_s']:.0f} s)", c["train"], eager_train)
            row(f"{variant} inference, compiled (× eager; {c['inference']['graphs']} graphs, "
                f"first call {c['inference']['first_call_s']:.0f} s)", c["inference"], eager_inf)
        for key, message in m["errors"].items():
            lines.append(f"| {name} | {key}: FAILED | {message} | | | | | | | |")
    tasks = results.get("tasks")
    if tasks and tasks.get("runs"):
        lines += ["", f"Time per task: {tasks['model']}, APT + linear head, {tasks['images_per_task']} images per "
                      "task, 1 epoch, IncrementalTrainer.run (task 0 kept out of the medians)", "",
                  "| tasks | median s/task | img/s | task 0 s | late / early tasks |", "|---:|---:|---:|---:|---:|"]
        for count, r in tasks["runs"].items():
            lines.append(f"| {count} | {r['median_s']:.3f} | {r['img_per_s']:,.0f} | {r['task_s'][0]:.3f} | "
                         f"{r['growth']:.2f} |")
    if tasks and tasks.get("error"):
        lines += ["", f"Time per task FAILED: {tasks['error']}"]
    lines += ["", "| target | model | measured | needed | result |", "|---|---|---:|---|---|"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {t['model']} | {fmt(t['value'], 3)} | {t['needed']} | {verdict} |")
    return "\n".join(lines)
