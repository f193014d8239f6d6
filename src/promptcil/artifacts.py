"""Artifacts on disk: safetensors payloads, JSON manifests, atomic writes.

Every file promptcil writes goes through `atomic_write_bytes`, so readers (DVC,
MLflow, a resumed training run) never see a half-written file. Tensors are stored
as safetensors next to a JSON manifest that records their sha256; loading checks
the manifest before any tensor is parsed, and pickle-based files are refused,
because unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from promptcil.errors import ArtifactError

MANIFEST_FORMAT = "promptcil-artifact/1"
PAYLOAD_SUFFIX = ".safetensors"

_PICKLE_REFUSED = "pickle-based files are refused; promptcil loads safetensors only"
# Read once: mkstemp creates files 0o600, which would hide artifacts from other users of a shared cache.
_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactKind(StrEnum):
    """What a payload holds, recorded in its manifest: loading with another kind is refused, so a head
    state cannot be loaded as a prompt. The one list of kinds; every reader and writer names one."""

    IMAGE_DATA = "image_data"  # prepare: uint8 images + labels of a split
    BACKBONE = "backbone"  # pretrain: the trained backbone's weights
    FEATURES = "features"  # features: frozen-backbone statistics of the training data
    TOKEN_SAMPLE = "token_sample"  # features: every token entering every block, for a sample of task 0's images
    PROTOTYPES = "prototypes"  # prototypes: class means, layer affinity
    PROMPT_INIT = "prompt_init"  # prompt_init: the initial prompt
    CHECKPOINT = "checkpoint"  # train: resumable state mid-run
    TASK_STATE = "task_state"  # train: prompt + head after a task (what a registry version carries)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` survive a power cut, not only a killed process (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder (same filesystem, so the final
    `os.replace` is atomic), are fsynced, then renamed over `path`. On failure the
    temporary file is removed and any existing `path` is left untouched.
    """
    path = Path(path)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def _json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed indent) so identical content gives identical bytes for DVC."""
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8")


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as canonical JSON."""
    atomic_write_bytes(Path(path), _json_bytes(obj))


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into one actionable line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} does not exist; run the step that writes it first") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); delete it and rerun the step that writes it"
        ) from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so large backbone checkpoints do not have to fit in memory."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest_path(path: Path) -> Path:
    """The manifest that commits the payload at `path`."""
    return Path(path).with_suffix(".json")


def _check_payload_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix != PAYLOAD_SUFFIX:
        raise ArtifactError(f"{path}: artifact payloads must end with {PAYLOAD_SUFFIX}; rename the path")
    return path


def _is_safetensors(data: bytes) -> bool:
    """Cheap format check: an 8-byte little-endian header length, then a JSON header that fits in the file."""
    header_len = int.from_bytes(data[:8], "little")
    return len(data) >= 8 and 8 + header_len <= len(data) and data[8:9] == b"{"


def _is_pickle(head: bytes) -> bool:
    """torch.save writes a zip archive (PK..) or, in the legacy format, a raw pickle (protocol >= 2: 0x80).

    Only meaningful for a file already known not to be safetensors, whose first byte may also be 0x80.
    """
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _not_safetensors(path: Path, head: bytes, cause: object) -> ArtifactError:
    """Name pickles explicitly, since they are the files people most often hand over by mistake."""
    if _is_pickle(head):
        return ArtifactError(f"{path} is a pickle (torch.save) file: {_PICKLE_REFUSED}")
    return ArtifactError(f"{path} is not a valid safetensors file ({cause}); rewrite it")


def _describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Shapes and dtypes as recorded in a manifest, readable by reviewers without loading the payload."""
    return {
        name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        for name, tensor in tensors.items()
    }


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], kind: str, metadata: dict[str, Any] | None = None
) -> dict:
    """Save `tensors` as a safetensors payload at `path` plus its manifest `path.with_suffix(".json")`.

    Commit protocol (the manifest is the commit point):
      1. remove an existing manifest, so the old artifact stops being loadable;
      2. atomically write the payload;
      3. atomically write the manifest, which names the payload and records its sha256.
    A payload without a manifest is an interrupted write, not an artifact, so a process
    killed at any moment leaves either no loadable artifact or a complete, consistent one.
    The manifest is serialised before step 1, so unserialisable metadata fails without
    touching the previous artifact. Returns the manifest.
    """
    return _commit(*_serialised(path, tensors, kind, metadata))


def _serialised(
    path: Path, tensors: dict[str, torch.Tensor], kind: str, metadata: dict[str, Any] | None
) -> tuple[Path, bytes, dict]:
    """The payload's bytes and its manifest, hash to come; unserialisable metadata fails here, before any file."""
    path = _check_payload_path(path)
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    payload = safetensors.torch.save(prepared)
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "file": path.name, "sha256": "", "bytes": len(payload),
                "tensors": _describe(prepared), "metadata": metadata}
    _json_bytes(manifest)
    return path, payload, manifest


def _commit(path: Path, payload: bytes, manifest: dict) -> dict:
    """Steps 1-3 of `save_tensors`' protocol. Hashing and writing release the GIL: this can run on a thread."""
    manifest = manifest | {"sha256": hashlib.sha256(payload).hexdigest()}
    manifest_bytes = _json_bytes(manifest)
    manifest_file = manifest_path(path)
    try:
        manifest_file.unlink(missing_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot write {manifest_file}: {exc.strerror or exc}") from exc
    atomic_write_bytes(path, payload)
    atomic_write_bytes(manifest_file, manifest_bytes)
    return manifest


@contextmanager
def saving_in_background(
    path: Path, tensors: dict[str, torch.Tensor], kind: str, metadata: dict[str, Any] | None = None
) -> Iterator[Future[dict]]:
    """`save_tensors` whose hashing, writing and fsync run on a thread while the block runs: they wait on memory
    and disk, not on the GPU work the block drives. Serialising holds the GIL, so it happens first, here (bad
    metadata fails before the block). The block's end waits for the write; if the block raises, the artifact is
    removed once written: a failed stage leaves nothing behind."""
    serialised = _serialised(path, tensors, kind, metadata)
    with ThreadPoolExecutor(1, thread_name_prefix="save") as pool:
        pending = pool.submit(_commit, *serialised)
        try:
            yield pending
        except BaseException:
            pending.exception()  # the write finished, or failed, before its files are removed
            manifest_path(path).unlink(missing_ok=True)  # the commit point first
            Path(path).unlink(missing_ok=True)
            raise
        pending.result()  # a failed write raises here, after the block's work


def _read_verified(path: Path, kind: str | None) -> tuple[bytes, dict]:
    """Read the payload once and check it against its manifest, so what is verified is what is parsed."""
    path = _check_payload_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} does not exist; run the step that writes it first") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not _is_safetensors(data):
        raise _not_safetensors(path, data[:4], "bad header")
    manifest_file = manifest_path(path)
    if not manifest_file.exists():
        raise ArtifactError(
            f"{path}: no manifest: interrupted write or not a promptcil artifact "
            f"(expected {manifest_file.name} next to it); rerun the step that writes it"
        )
    manifest = read_json(manifest_file)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{manifest_file} is not a {MANIFEST_FORMAT} manifest; rerun the step that writes it")
    if manifest.get("file") != path.name:
        raise ArtifactError(
            f"{manifest_file} describes {manifest.get('file')!r}, not {path.name!r} (a swapped or copied manifest); "
            "rerun the step that writes it"
        )
    if manifest.get("bytes") != len(data) or manifest.get("sha256") != hashlib.sha256(data).hexdigest():
        raise ArtifactError(
            f"{path} does not match the sha256 in {manifest_file.name}: modified after it was written; "
            "rerun the step that writes it"
        )
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{path} holds a {manifest.get('kind')!r} artifact, expected {kind!r}; check the path")
    return data, manifest


def verify(path: Path) -> dict:
    """Check the manifest and sha256 of the artifact at `path` without building tensors; return the manifest."""
    return _read_verified(path, kind=None)[1]


def load_tensors(
    path: Path, kind: str | None = None, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a verified artifact written by `save_tensors`; return (tensors, manifest).

    `kind`, when given, must match the manifest, so a head state cannot be loaded as a prompt.
    """
    path = Path(path)
    data, manifest = _read_verified(path, kind)
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as exc:
        raise _not_safetensors(path, data[:4], exc) from exc
    if _describe(tensors) != manifest.get("tensors"):
        raise ArtifactError(
            f"{manifest_path(path)} lists other tensors than {path.name} holds; rerun the step that writes it"
        )
    return {name: tensor.to(device) for name, tensor in tensors.items()}, manifest


def _weights_only_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's message that names the offending global, without its advice to disable the check."""
    for line in str(exc).splitlines():
        if "Unsupported global" in line:
            return f" ({line.strip().removeprefix('WeightsUnpickler error: ')})"
    return ""


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load user-supplied backbone weights (no manifest): safetensors, or torch.save with weights_only=True.

    A checkpoint dict holding the weights under "state_dict" or "model" is unwrapped,
    as written by timm's and most training scripts.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} does not exist; check the backbone checkpoint path") from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix == PAYLOAD_SUFFIX:
        try:
            return safetensors.torch.load_file(path)
        except SafetensorError as exc:
            raise _not_safetensors(path, head, exc) from exc
    if not _is_pickle(head):
        raise ArtifactError(f"{path} is neither a safetensors file nor a torch.save checkpoint")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactError(
            f"{path}: weights_only loading refused it{_weights_only_reason(exc)}: it holds objects besides "
            "tensors; re-save a plain state_dict or convert it to safetensors"
        ) from exc
    except Exception as exc:  # a truncated or corrupt pickle fails with many exception types
        raise ArtifactError(f"{path} is not a readable torch.save checkpoint ({exc})") from exc
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in loaded.items()
    ):
        raise ArtifactError(
            f"{path} is not a state dict of named tensors (nor a checkpoint with one under 'state_dict' or 'model')"
        )
    return loaded
