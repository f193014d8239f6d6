"""Who wrote a resumable folder, and the rule that only the same producer may resume it.

A resumable folder (the train stage's checkpoints, a retrain's work folder, a study run) holds
`producer.json`: the params that affect what is written there and the sha256 of every input artifact.
A run that finds another producer's record (other params, another backbone, other data) must not
continue that work: it empties the folder, says so in one line, and starts clean. Without this, a
changed head resumed the old head's checkpoints (a KeyError) and a changed preset silently continued
the previous configuration's tasks (A_last 0.18 instead of 0.51 from clean outputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from promptcil.artifacts import manifest_path, read_json, write_json

RECORD_FILE = "producer.json"
logger = logging.getLogger("promptcil")


def producer_record(params: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """What produced a folder: `params` (JSON-able, only those that affect it) and `inputs` (name -> sha256)."""
    return {"params": json.loads(json.dumps(params, sort_keys=True, default=str)),
            "inputs": dict(sorted(inputs.items()))}


def artifact_sha256(path: Path) -> str:
    """The sha256 of a safetensors artifact as its manifest records it (loading it checks the payload)."""
    return read_json(manifest_path(Path(path)))["sha256"]


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def claim(folder: Path, record: dict[str, Any]) -> bool:
    """Make `folder` this producer's. True: it already was, so its work may be resumed. False: it was
    empty, or written by another producer (then emptied, with one line naming what differs); either way
    the record is written before any work, so an interrupted clean start is still recognised as ours."""
    folder = Path(folder)
    record_path = folder / RECORD_FILE
    if record_path.is_file():
        previous = read_json(record_path)
        if previous == record:
            return True
        logger.warning("%s was written with other %s: starting clean", folder, ", ".join(differences(previous, record)))
        _empty(folder)
    elif folder.is_dir() and any(folder.iterdir()):
        logger.warning("%s holds outputs without a producer record: starting clean", folder)
        _empty(folder)
    write_json(record_path, record)
    return False


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (at most five named), e.g. ['params.head.name', 'inputs.backbone']."""
    keys = sorted(set(old) | set(new))
    found: list[str] = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found if len(found) <= 5 else found[:5] + [f"{len(found) - 5} more"]


def _empty(folder: Path) -> None:
    """Remove everything inside `folder` (links are removed, never followed)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
