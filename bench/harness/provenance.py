"""What a result says about where and with which code it ran: device, versions, commit, code digest (meta)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch

from promptcil.prompts import METHODS

from harness.inputs import Run

REPO = Path(__file__).resolve().parents[2]  # the checkout: bench/harness/ is two folders down


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_digest() -> str:
    """The first 12 hex of a SHA-256 over the harness's and the library's Python files (paths and contents):
    it names the code that ran where git's metadata cannot (a copy of the checkout on another machine may
    carry stale git metadata). `python bench/speed.py --code-digest` prints the checkout's."""
    digest = hashlib.sha256()
    bench = REPO / "bench"
    for path in sorted([*(REPO / "src" / "promptcil").rglob("*.py"), *bench.glob("*.py"),
                        *(bench / "harness").glob("*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def meta(run: Run, now: datetime, *, compiled: bool, quick: bool) -> dict[str, Any]:
    """The result's meta before any section ran (the suite adds wall_s as it goes)."""
    device = run.device
    return {
        "device_name": device_name(device), "device": str(device), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "code": code_digest(), "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch_size": run.batch_size, "backbone_overrides": run.backbone_overrides,
        "timed_steps": run.steps // run.repeats * run.repeats, "repeats": run.repeats, "warmup": run.warmup,
        "compile": compiled, "quick": quick, "methods": [m for m in METHODS if m != "none"], "argv": sys.argv[1:],
    }
