"""PNG plots of a run for people (MLflow artifacts, DVC image plots)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from promptcil.artifacts import atomic_write_bytes, write_json  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def accuracy_matrix_png(matrix: list[list[float | None]], path: Path) -> None:
    """Heatmap of a[i][j] (row: after task i; column: on task j)."""
    values = np.array([[np.nan if a is None else a for a in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(matrix), 1.0 + 0.6 * len(matrix)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for (i, j), a in np.ndenumerate(values):
        if not np.isnan(a):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="white" if a < 0.6 else "black", fontsize=8)
    ax.set_xlabel("on task j")
    ax.set_ylabel("after task i")
    ax.set_xticks(range(len(matrix)))
    ax.set_yticks(range(len(matrix)))
    ax.set_title("accuracy matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def accuracy_after_task_png(accuracy: list[float], path: Path) -> None:
    """Accuracy on all classes seen so far, after each task."""
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(len(accuracy)), accuracy, marker="o")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(accuracy)))
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on seen classes")
    ax.grid(alpha=0.3)
    _save(fig, path)


def layer_affinity_png(affinity: np.ndarray, path: Path, anchors: list[int] | None = None) -> None:
    """Block x block cosine affinity of the features entering each block; SHIP's level anchors marked."""
    depth = affinity.shape[0]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * depth, 1.2 + 0.4 * depth))
    image = ax.imshow(affinity, vmin=min(0.0, float(affinity.min())), vmax=1, cmap="magma")
    for anchor in anchors or []:
        ax.axhline(anchor - 0.5, color="cyan", linewidth=1)
        ax.axvline(anchor - 0.5, color="cyan", linewidth=1)
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    ax.set_title("layer affinity" + (f" (levels start at {anchors})" if anchors else ""))
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def write_accuracy_plots(metrics: dict, folder: Path) -> None:
    """The plots a run carries (pipeline and retrain alike): the accuracy matrix and the accuracy after each
    task, as JSON for `dvc plots` and as PNG for MLflow, under `folder`/plots."""
    plots = Path(folder) / "plots"
    write_json(plots / "accuracy_after_task.json", [
        {"task": t, "accuracy": a} for t, a in enumerate(metrics["accuracy_after_task"])
    ])
    write_json(plots / "accuracy_matrix.json", [
        {"after_task": i, "on_task": j, "accuracy": a}
        for i, row in enumerate(metrics["accuracy_matrix"]) for j, a in enumerate(row) if a is not None
    ])
    accuracy_matrix_png(metrics["accuracy_matrix"], plots / "accuracy_matrix.png")
    accuracy_after_task_png(metrics["accuracy_after_task"], plots / "accuracy_after_task.png")
