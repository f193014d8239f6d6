"""The prepare stage's outputs, read back: the task split and the uint8 images of a split."""

from __future__ import annotations

from pathlib import Path

from promptcil.artifacts import ArtifactKind, load_tensors, read_json, save_tensors, write_json
from promptcil.data.sources import ImageSet
from promptcil.data.tasks import TaskSplit

TASKS_FILE = "tasks.json"


def read_task_split(folder: Path) -> TaskSplit:
    return TaskSplit.from_dict(read_json(Path(folder) / TASKS_FILE)["split"])


def read_image_set(folder: Path, split: str) -> ImageSet:
    """The prepared (relabelled, uint8) images of `split` ("train" or "test")."""
    tensors, manifest = load_tensors(Path(folder) / f"{split}.safetensors", kind=ArtifactKind.IMAGE_DATA)
    return ImageSet(tensors["images"], tensors["labels"], manifest["metadata"]["class_names"])


def write_image_set(folder: Path, split: str, data: ImageSet, source: str) -> dict:
    """Save a split as the prepare stage does; returns the manifest (its sha256 names the data)."""
    return save_tensors(Path(folder) / f"{split}.safetensors", {"images": data.images, "labels": data.labels},
                        kind=ArtifactKind.IMAGE_DATA, metadata={"class_names": data.class_names, "source": source})


def write_task_split(folder: Path, summary: dict) -> None:
    write_json(Path(folder) / TASKS_FILE, summary)
