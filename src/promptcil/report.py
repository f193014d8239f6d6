"""What a person reads at the end of a run: the accuracy table and where the results live."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
    console = Console()
    if metrics is not None:
        table = Table(title="accuracy matrix: row = after task i, column = on task j")
        table.add_column("after task")
        for j in range(len(metrics["accuracy_matrix"])):
            table.add_column(f"task {j}", justify="right")
        table.add_column("seen classes", justify="right")
        for i, row in enumerate(metrics["accuracy_matrix"]):
            cells = ["" if a is None else f"{a:.3f}" for a in row]
            table.add_row(str(i), *cells, f"{metrics['accuracy_after_task'][i]:.3f}")
        console.print(table)
    console.print(f"A_last {summary['A_last']:.3f}   A_avg {summary['A_avg']:.3f}")
    if "version" in summary:
        console.print(
            f"MLflow run {summary['run_id']} in {summary.get('tracking_uri', '')}; registry: "
            f"{summary['model_name']} version {summary['version']} (review=pending, gate={summary['gate']})"
        )
