"""The target ratios the harness checks, and their PASS/MISS on a result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """A ratio the harness checks: measured value within [low, high] (either bound may be open)."""

    name: str
    low: float | None = None
    high: float | None = None

    @property
    def needed(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:.2f} .. {self.high:.2f}"
        return f">= {self.low:.2f}" if self.low is not None else f"<= {self.high:.2f}"

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


APT_TRAIN = Target("APT train step / fwd+bwd limit", low=0.90)
APT_INFERENCE = Target("APT inference / plain forward", low=0.95)
APT_FLOPS = Target("APT GFLOPs / plain", high=1.01)
L2P_FLOPS = Target("L2P GFLOPs / plain (about 2x)", low=1.8, high=2.5)
FEATURES = Target("features stage / plain forward", low=0.90)
APT_MEMORY = Target("APT train step memory / limit", high=1.10)
TASKS_ACROSS = Target("time per task: slowest / fastest task count", high=1.10)
TASKS_ALONG = Target("time per task: late / early tasks, longest run", high=1.10)


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    a, b = a or {}, b or {}
    return a[key] / b[key] if key in a and b.get(key) else None


def flops_ratio(flops: dict[str, float], method: str) -> float | None:
    return flops[method] / flops["plain"] if method in flops and flops.get("plain") else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    measured: list[tuple[Target, str, float | None]] = []
    for name, m in results["models"].items():
        inference, train, flops = m["inference"], m["train"], m["gflops"]
        measured += [
            (APT_TRAIN, name, ratio(train.get("apt"), train.get("limit"), "img_per_s")),
            (APT_INFERENCE, name, ratio(inference.get("apt"), inference.get("plain"), "img_per_s")),
            (APT_FLOPS, name, flops_ratio(flops, "apt")),
            (L2P_FLOPS, name, flops_ratio(flops, "l2p")),
            (FEATURES, name, ratio(m.get("features"), inference.get("plain"), "img_per_s")),
            # the step's own memory (activations, gradients), beyond the weights and inputs both hold
            (APT_MEMORY, name, ratio(train.get("apt"), train.get("limit"), "step_mib")),
        ]
    tasks = results.get("tasks") or {}
    if "spread_across_runs" in tasks:
        measured += [(TASKS_ACROSS, tasks["model"], tasks["spread_across_runs"]),
                     (TASKS_ALONG, tasks["model"], tasks["growth_in_longest_run"])]
    return [{"target": t.name, "model": model, "value": value, "needed": t.needed, "pass": t.check(value)}
            for t, model, value in measured]
