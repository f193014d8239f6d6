"""The prepare stage's outputs, read back: the task split and the uint8 images of a split."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from promptcil.artifacts import ArtifactKind, load_tensors, manifest_path, read_json, save_tensors, write_json
from promptcil.data.shards import SHARD_DIR, ShardedImageSet, index_file, read_shards
from promptcil.data.sources import ImageSet
from promptcil.data.tasks import TaskSplit
from promptcil.provenance import artifact_sha256

TASKS_FILE = "tasks.json"


def read_task_split(folder: Path) -> TaskSplit:
    return TaskSplit.from_dict(read_json(Path(folder) / TASKS_FILE)["split"])


def read_image_set(folder: Path, split: str, data: Any = None) -> ImageSet | ShardedImageSet:
    """The prepared (relabelled) images of `split` ("train" or "test"): uint8 in memory, or shards on disk when
    prepare wrote them (data.shards), loaded as params' `data` section says (decode, decode_cpu_share,
    loader_workers)."""
    if index_file(folder, split).exists():
        sharded = read_shards(Path(folder), split)
        if data is None:
            return sharded
        return sharded.with_loading(data.decode, data.loader_workers, data.decode_cpu_share)
    tensors, manifest = load_tensors(Path(folder) / f"{split}.safetensors", kind=ArtifactKind.IMAGE_DATA)
    return ImageSet(tensors["images"], tensors["labels"], manifest["metadata"]["class_names"])


def images_sha256(folder: Path, split: str) -> str:
    """What names a prepared split's images, either layout: the payload's sha256 for images in one file; for
    shards, the sha256 of the index's together with every shard's (a changed shard changes it)."""
    index = index_file(folder, split)
    if not index.exists():
        return artifact_sha256(Path(folder) / f"{split}.safetensors")
    manifest = read_json(manifest_path(index))
    names = [manifest["sha256"], *(shard["sha256"] for shard in manifest["metadata"]["shards"])]
    return hashlib.sha256(" ".join(names).encode()).hexdigest()


def write_image_set(folder: Path, split: str, data: ImageSet, source: str) -> dict:
    """Save a split as the prepare stage does; returns the manifest (its sha256 names the data)."""
    return save_tensors(Path(folder) / f"{split}.safetensors", {"images": data.images, "labels": data.labels},
                        kind=ArtifactKind.IMAGE_DATA, metadata={"class_names": data.class_names, "source": source})


def drop_other_layout(folder: Path, sharded: bool) -> None:
    """Remove what a prepare of the other layout left in `folder` (readers prefer shards when an index exists)."""
    import shutil

    if not Path(folder).is_dir():  # nothing there (or not a folder: writing will say so, in one line)
        return
    for split in ("train", "test"):
        stale = [index_file(folder, split)] if not sharded else [Path(folder) / f"{split}.safetensors"]
        for path in stale:
            path.unlink(missing_ok=True)
            manifest_path(path).unlink(missing_ok=True)
    if not sharded:
        shutil.rmtree(Path(folder) / SHARD_DIR, ignore_errors=True)


def write_task_split(folder: Path, summary: dict) -> None:
    write_json(Path(folder) / TASKS_FILE, summary)
