"""Artifacts: real safetensors files on disk, tampering, pickles, failed writes and killed writers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from promptcil.artifacts import (
    ArtifactError,
    atomic_write_bytes,
    load_tensors,
    load_weights_file,
    read_json,
    save_tensors,
    saving_in_background,
    sha256_file,
    verify,
    write_json,
)


class NotAWeight:
    """An arbitrary object: unpickling it would import and construct code, which weights_only refuses."""

    def __init__(self) -> None:
        self.payload = "anything"


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "prompt": torch.randn(4, 8),
        "half": torch.randn(3).to(torch.bfloat16),
        "labels": torch.arange(5),
        "strided": torch.randn(6, 4).t(),
    }


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_writes_payload_and_manifest(tmp_path: Path) -> None:
    path = tmp_path / "prompts" / "task_0.safetensors"
    tensors = _tensors()
    manifest = save_tensors(path, tensors, kind="prompt", metadata={"task": 0, "method": "apt"})

    assert sorted(p.name for p in path.parent.iterdir()) == ["task_0.json", "task_0.safetensors"]
    assert json.loads(path.with_suffix(".json").read_text()) == manifest
    assert manifest["format"] == "promptcil-artifact/1"
    assert manifest["kind"] == "prompt"
    assert manifest["file"] == "task_0.safetensors"
    assert manifest["sha256"] == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["bytes"] == path.stat().st_size
    assert manifest["tensors"]["prompt"] == {"shape": [4, 8], "dtype": "float32"}
    assert manifest["tensors"]["half"] == {"shape": [3], "dtype": "bfloat16"}
    assert manifest["tensors"]["strided"] == {"shape": [4, 6], "dtype": "float32"}
    assert manifest["metadata"] == {"task": 0, "method": "apt"}

    loaded, loaded_manifest = load_tensors(path, kind="prompt")
    assert loaded_manifest == manifest == verify(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_files_get_umask_permissions_not_tempfile_private_ones(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.zeros(1)}, kind="prompt")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_overwrite_replaces_previous_artifact(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    save_tensors(path, {"w": torch.zeros(3)}, kind="head", metadata={"version": 1})
    save_tensors(path, {"w": torch.ones(5)}, kind="head", metadata={"version": 2})
    loaded, manifest = load_tensors(path, kind="head")
    assert torch.equal(loaded["w"], torch.ones(5))
    assert manifest["metadata"] == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]


def test_background_save_lands_when_the_block_succeeds_and_is_removed_when_it_fails(tmp_path: Path) -> None:
    path = tmp_path / "tokens.safetensors"
    with saving_in_background(path, {"t": torch.arange(6.0)}, kind="token_sample") as pending:
        pass
    assert pending.result()["sha256"] == verify(path)["sha256"]
    assert torch.equal(load_tensors(path, kind="token_sample")[0]["t"], torch.arange(6.0))
    with pytest.raises(RuntimeError, match="the pass failed"):
        with saving_in_background(path, {"t": torch.ones(4)}, kind="token_sample"):
            raise RuntimeError("the pass failed")
    assert list(tmp_path.iterdir()) == []  # neither the new artifact nor a temporary file


def test_background_save_refuses_bad_metadata_before_the_block(tmp_path: Path) -> None:
    ran = []
    with pytest.raises(TypeError):
        with saving_in_background(tmp_path / "t.safetensors", {"t": torch.ones(2)}, kind="x",
                                  metadata={"bad": object()}):
            ran.append(True)
    assert ran == [] and list(tmp_path.iterdir()) == []


def test_unserialisable_metadata_leaves_previous_artifact_loadable(tmp_path: Path) -> None:
    path = tmp_path / "head.safetensors"
    save_tensors(path, {"w": torch.zeros(3)}, kind="head")
    with pytest.raises(TypeError):
        save_tensors(path, {"w": torch.ones(3)}, kind="head", metadata={"bad": object()})
    loaded, _ = load_tensors(path, kind="head")
    assert torch.equal(loaded["w"], torch.zeros(3))


def test_modified_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_tensors(path, {"w": torch.randn(16)}, kind="prompt")
    _flip_last_byte(path)
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load_tensors(path)
    with pytest.raises(ArtifactError, match="modified after it was written"):
        verify(path)


def test_manifest_copied_from_another_artifact_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_tensors(first, {"w": torch.zeros(2)}, kind="prompt")
    save_tensors(second, {"w": torch.ones(2)}, kind="prompt")
    shutil.copy(first.with_suffix(".json"), second.with_suffix(".json"))
    with pytest.raises(ArtifactError, match="swapped or copied manifest"):
        load_tensors(second)


def test_manifest_of_a_same_named_artifact_elsewhere_is_refused(tmp_path: Path) -> None:
    left, right = tmp_path / "a" / "p.safetensors", tmp_path / "b" / "p.safetensors"
    save_tensors(left, {"w": torch.zeros(2)}, kind="prompt")
    save_tensors(right, {"w": torch.ones(2)}, kind="prompt")
    shutil.copy(left.with_suffix(".json"), right.with_suffix(".json"))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load_tensors(right)


def test_manifest_listing_other_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    manifest = save_tensors(path, {"w": torch.zeros(2)}, kind="prompt")
    manifest["tensors"]["w"]["shape"] = [3]
    path.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lists other tensors"):
        load_tensors(path)


def test_corrupt_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, kind="prompt")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_tensors(path)


def test_payload_without_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, kind="prompt")
    path.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="no manifest: interrupted write or not a promptcil artifact"):
        load_tensors(path)


def test_missing_payload_wrong_kind_and_wrong_suffix_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_tensors(tmp_path / "absent.safetensors")
    path = tmp_path / "head.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, kind="head")
    with pytest.raises(ArtifactError, match="holds a 'head' artifact, expected 'prompt'"):
        load_tensors(path, kind="prompt")
    with pytest.raises(ArtifactError, match="must end with .safetensors"):
        save_tensors(tmp_path / "head.pt", {"w": torch.zeros(2)}, kind="head")


@pytest.mark.parametrize("with_manifest", [False, True])
def test_pickle_renamed_to_safetensors_is_refused(tmp_path: Path, with_manifest: bool) -> None:
    path = tmp_path / "p.safetensors"
    if with_manifest:
        save_tensors(path, {"w": torch.zeros(2)}, kind="prompt")
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="pickle-based files are refused; promptcil loads safetensors only"):
        load_tensors(path)
    with pytest.raises(ArtifactError, match="pickle-based files are refused"):
        load_weights_file(path)


def test_load_weights_file_accepts_safetensors_and_plain_state_dicts(tmp_path: Path) -> None:
    state = {"blocks.0.attn.qkv.weight": torch.randn(6, 2), "head.bias": torch.zeros(3)}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": state, "epoch": 7, "arch": "vit_tiny"}, tmp_path / "checkpoint.pth")
    torch.save({"model": state}, tmp_path / "model.pth")
    for name in ["w.safetensors", "plain.pth", "checkpoint.pth", "model.pth"]:
        loaded = load_weights_file(tmp_path / name)
        assert loaded.keys() == state.keys(), name
        assert all(torch.equal(loaded[k], state[k]) for k in state), name


def test_load_weights_file_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "extra": NotAWeight()}, path)
    with pytest.raises(ArtifactError, match="weights_only loading refused it") as caught:
        load_weights_file(path)
    assert "NotAWeight" in str(caught.value)


def test_load_weights_file_refuses_non_state_dicts_and_missing_files(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ArtifactError, match="not a state dict"):
        load_weights_file(tmp_path / "list.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ArtifactError, match="neither a safetensors file nor a torch.save checkpoint"):
        load_weights_file(tmp_path / "text.pth")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_weights_file(tmp_path / "absent.pth")
    torch.save({"w": torch.randn(64)}, tmp_path / "truncated.pth")
    data = (tmp_path / "truncated.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable torch.save checkpoint"):
        load_weights_file(tmp_path / "truncated.pth")


def test_json_is_canonical_and_read_errors_are_artifact_errors(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "metrics.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [1, 2], "b": 1}
    with pytest.raises(ArtifactError, match="does not exist"):
        read_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("[1,")
    with pytest.raises(ArtifactError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_atomic_write_into_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        try:
            (folder / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod 0o500 does not block writes (see the parent-is-a-file test)")
        with pytest.raises(ArtifactError, match=r"cannot write .*x\.json: Permission denied"):
            atomic_write_bytes(folder / "x.json", b"{}")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_atomic_write_where_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a regular file")
    with pytest.raises(ArtifactError, match=r"cannot write .*blocker/x\.json: "):
        atomic_write_bytes(blocker / "x.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    assert blocker.read_bytes() == b"a regular file"


def test_failed_write_removes_temp_file_and_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.json"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ArtifactError, match=r"cannot write .*x\.json: No space left on device"):
        atomic_write_bytes(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert target.read_bytes() == b"old"


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from promptcil.artifacts import save_tensors

    path, step = Path(sys.argv[1]), 0
    while True:
        save_tensors(
            path,
            {"w": torch.full((2_000_000,), float(step)), "step": torch.tensor([step])},
            kind="stress",
            metadata={"step": step},
        )
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_during_save_never_leaves_a_loadable_inconsistent_artifact(tmp_path: Path) -> None:
    """Writers killed at different moments: each artifact either loads consistently or is refused."""
    delays = [0.0, 0.05, 0.1, 0.2]
    paths = [tmp_path / f"run{k}" / "state.safetensors" for k in range(len(delays))]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in paths
    ]
    try:
        for writer, delay in zip(writers, delays):
            first = writer.stdout.readline()
            assert first.strip() == "0", f"writer failed before its first save: {writer.stderr.read()}"
            time.sleep(delay)
            writer.send_signal(signal.SIGKILL)
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
            writer.stdout.close()
            writer.stderr.close()

    for path in paths:
        try:
            tensors, manifest = load_tensors(path, kind="stress")
        except ArtifactError as exc:
            assert "no manifest" in str(exc) or "does not exist" in str(exc), str(exc)
            continue
        step = manifest["metadata"]["step"]
        assert tensors["step"].item() == step
        assert torch.all(tensors["w"] == float(step))
