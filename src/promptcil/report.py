"""What a person reads at the end of a run: the accuracy table, the numbers the gate judges, the ceiling,
and where the version lives in the registry."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_summary(metrics: dict[str, Any], registration: dict[str, Any] | None = None) -> None:
    console = Console(highlight=False)
    table = Table(title="accuracy matrix: row = after task i, column = on task j")
    table.add_column("after task")
    for j in range(len(metrics["accuracy_matrix"])):
        table.add_column(f"task {j}", justify="right")
    table.add_column("seen classes", justify="right")
    for i, row in enumerate(metrics["accuracy_matrix"]):
        table.add_row(str(i), *("" if a is None else f"{a:.3f}" for a in row),
                      f"{metrics['accuracy_after_task'][i]:.3f}")
    console.print(table)
    last = metrics["accuracy_matrix"][-1]
    console.print(f"A_last {_fmt(metrics['A_last'])}   A_avg {_fmt(metrics['A_avg'])}   "
                  f"forgetting {_fmt(metrics.get('forgetting'))}   newest task {_fmt(last[-1])}   base {_fmt(last[0])}")
    if metrics.get("A_joint") is not None:
        console.print(f"joint bound {_fmt(metrics['A_joint'])} (same head, all classes at once); "
                      f"A_last / joint {metrics['A_last_vs_joint']:.2f}")
    if registration is not None:
        reasons = f" ({registration['gate_reasons']})" if registration.get("gate_reasons") else ""
        console.print(
            f"MLflow run {registration['run_id']} in {registration.get('tracking_uri', '')}\n"
            f"registry: {registration['model_name']} version {registration['version']} "
            f"(review=pending, gate={registration['gate']}{reasons})", markup=False)
