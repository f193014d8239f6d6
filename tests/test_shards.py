"""Sharded images (data.shards): WebDataset tar shards of real JPEG/PNG files made from scikit-learn's digits,
prepared, read back by index and streamed; the whole pipeline on shards equals the in-memory pipeline."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from promptcil.config import ConfigError, DataConfig
from promptcil.data import DataError, device_batches, load_split, read_image_set, subset
from promptcil.data.shards import ShardedImageSet, verify_shards
from promptcil.workspace import Workspace

from conftest import make_params, project_params, write_params

BACKBONE = {"source": "random", "img_size": 16}


def digits_folder(root: Path, per_class: int = 30) -> Path:
    """root/{train,test}/digit-<k>/<n>.jpg: 16 px RGB JPEGs of the digits, every fifth a PNG, one greyscale JPEG."""
    digits = load_digits()
    seen: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        n = seen.get(int(label), 0)
        if n >= per_class:
            continue
        seen[int(label)] = n + 1
        split = "test" if n % 3 == 0 else "train"
        folder = root / split / f"digit-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).resize((16, 16))
        if n == 1:
            pixels.save(folder / f"{n:03d}.jpg", quality=90)  # greyscale JPEG
        elif n % 5 == 0:
            pixels.convert("RGB").save(folder / f"{n:03d}.png")
        else:
            pixels.convert("RGB").save(folder / f"{n:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits-files"))


def prepared(project: Path, root: Path, shards: bool, **data: object) -> Workspace:
    from stages import prepare

    project.mkdir(parents=True, exist_ok=True)
    write_params(project, data={"source": "imagefolder", "root": str(root), "shards": shards, "shard_images": 8,
                                **data}, backbone=BACKBONE)
    workspace = Workspace(project)
    prepare.run(project_params(project), workspace, progress=False)
    return workspace


def test_shards_hold_every_file_and_decode_as_the_in_memory_source(tmp_path: Path, folder: Path) -> None:
    workspace = prepared(tmp_path, folder, shards=True)
    out = workspace.of("prepare")
    sharded = read_image_set(out, "train")
    memory = load_split(DataConfig(source="imagefolder", root=folder), "train", 16)
    split_order = json.loads((out / "tasks.json").read_text())["split"]["class_order"]
    assert split_order != sorted(split_order)  # a real permutation: labels are not the folders' order
    assert isinstance(sharded, ShardedImageSet) and len(sharded) == len(memory)
    assert sharded.class_names == [memory.class_names[c] for c in split_order]
    # one class per shard, at most shard_images each; WebDataset members: <class>/<n>.{jpg,png,path}
    tars = sorted((out / "shards" / "train").rglob("*.tar"))
    assert len(tars) == sum(-(-20 // 8) for _ in range(10))
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["digit-0/000000.jpg", "digit-0/000000.path"] and len(names) == 16
    # the same images and labels in the same order as the in-memory layout (exact: libjpeg-turbo both ways)
    relabelled = {name: k for k, name in enumerate(sharded.class_names)}
    expected = torch.tensor([relabelled[memory.class_names[int(c)]] for c in memory.labels])
    images, labels = next(device_batches(sharded, 10_000, torch.device("cpu")))
    assert torch.equal(labels, expected) and torch.equal(sharded.labels, expected)
    assert torch.equal(images, memory.images)
    assert torch.equal(sharded.first(3), memory.images[:3])
    verify_shards(out, "train")


def test_batches_match_the_in_memory_loader_for_any_workers_and_ranks(tmp_path: Path, folder: Path) -> None:
    from promptcil.distributed import Ranks

    sharded = read_image_set(prepared(tmp_path / "s", folder, shards=True).of("prepare"), "train")
    memory = read_image_set(prepared(tmp_path / "m", folder, shards=False).of("prepare"), "train")
    task = [0, 1]
    for workers in (0, 2):
        for ranks in (None, Ranks(1, 2, 0)):
            got = list(device_batches(subset(sharded.with_loading("cpu", workers), task), 7, torch.device("cpu"),
                                      shuffle=True, seed=3, ranks=ranks))
            want = list(device_batches(subset(memory, task), 7, torch.device("cpu"), shuffle=True, seed=3, ranks=ranks))
            assert len(got) == len(want)
            for (a, x), (b, y) in zip(got, want):
                assert torch.equal(a, b) and torch.equal(x, y)
    # a task's loader opens only its own classes' shards
    opened = {sharded.shards[int(s)] for s in subset(sharded, task).shard}
    assert opened == {s for s in sharded.shards if s.split("/")[2] in {sharded.class_names[c] for c in task}}


def test_pipeline_on_shards_equals_the_pipeline_in_memory(tmp_path: Path, folder: Path) -> None:
    from stages import evaluate, features, pretrain, prompt_init, prototypes, train

    metrics = {}
    for shards in (True, False):
        project = tmp_path / str(shards)
        workspace = prepared(project, folder, shards=shards)
        params = project_params(project)
        for stage in (pretrain, features, prototypes, prompt_init, train):
            stage.run(params, workspace, progress=False)
        metrics[shards] = evaluate.run(params, workspace, progress=False)
    assert metrics[True]["accuracy_matrix"] == metrics[False]["accuracy_matrix"]
    assert metrics[True]["A_last"] > 0.2  # ten classes: above chance with a random backbone's features


def test_a_corrupt_image_stops_prepare_naming_it_and_leaves_nothing(tmp_path: Path, folder: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    bad = next((root / "train" / "digit-3").glob("*.jpg"))
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        prepared(tmp_path / "p", root, shards=True)
    left = tmp_path / "p" / "outputs" / "prepare"
    assert not list(left.rglob("*.tar")) and not list(left.glob("*.shards.*"))


def test_a_damaged_shard_names_the_original_file(tmp_path: Path, folder: Path) -> None:
    out = prepared(tmp_path, folder, shards=True).of("prepare")
    data = read_image_set(out, "train").with_loading("cpu", 0)
    i = 5
    shard = out / data.shards[int(data.shard[i])]
    raw = bytearray(shard.read_bytes())
    start = int(data.offset[i])
    raw[start:start + int(data.size[i])] = bytes(int(data.size[i]))  # the image's bytes zeroed
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"shard .* differs from its index"):
        verify_shards(out, "train")
    with pytest.raises(DataError, match=r"cannot decode image train/digit-\d/\d+\.(jpg|png) in shard"):
        list(device_batches(data, 64, torch.device("cpu")))


def test_a_shard_cut_short_names_itself(tmp_path: Path, folder: Path) -> None:
    """A shard shorter than its index says (an image's bytes past its end would come back short, not as an
    error of the decoder)."""
    out = prepared(tmp_path, folder, shards=True).of("prepare")
    data = read_image_set(out, "train").with_loading("cpu", 2)
    shard = out / data.shards[int(data.shard[-1])]
    shard.write_bytes(shard.read_bytes()[:int(data.offset[-1]) + 10])
    with pytest.raises(DataError, match=rf"shard {shard} is shorter than its index: run the prepare stage again"):
        list(device_batches(data, 64, torch.device("cpu")))


def test_sources_that_cannot_be_sharded_say_so(tmp_path: Path) -> None:
    from stages import prepare

    write_params(tmp_path, data={"source": "digits", "shards": True}, backbone=BACKBONE)
    with pytest.raises(DataError, match="data.shards: source 'digits' cannot be sharded"):
        prepare.run(project_params(tmp_path), Workspace(tmp_path), progress=False)


def test_preparing_the_same_files_again_writes_the_same_shards(tmp_path: Path, folder: Path) -> None:
    """Shards are a function of the files: a second prepare (a second later, in another project) writes them
    byte for byte, so DVC keeps one copy of each and the stages after prepare see unchanged data. A tar
    member's time stamp (the clock, by default) would make every prepare a new data version."""
    import time

    from promptcil.data.prepared import images_sha256

    first = prepared(tmp_path / "a", folder, shards=True).of("prepare")
    time.sleep(1.1)  # tar keeps whole seconds
    second = prepared(tmp_path / "b", folder, shards=True).of("prepare")
    files = sorted(p.relative_to(first) for p in (first / "shards").rglob("*.tar"))
    assert files and files == sorted(p.relative_to(second) for p in (second / "shards").rglob("*.tar"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert images_sha256(first, "train") == images_sha256(second, "train")


def test_switching_layout_leaves_no_stale_files(tmp_path: Path, folder: Path) -> None:
    out = prepared(tmp_path, folder, shards=True).of("prepare")
    assert (out / "train.shards.safetensors").exists()
    prepared(tmp_path, folder, shards=False)
    assert not (out / "shards").exists() and not (out / "train.shards.safetensors").exists()
    assert not isinstance(read_image_set(out, "train"), ShardedImageSet)


def test_a_sharded_project_registers_and_retrains_on_an_incoming_class(tmp_path: Path, folder: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      prefect_harness: None) -> None:
    """Register from shards (the version carries the test split decoded), approve, then a retrain reads only
    the incoming class folder and adds it as one new task."""
    import shutil

    from mlflow import MlflowClient

    from flows.retrain import retrain
    from promptcil import tracking

    from conftest import run_stages

    root = tmp_path / "data"
    for split in ("train", "test"):  # the project knows digits 0-7; digit 8 arrives later
        for k in range(8):
            shutil.copytree(folder / split / f"digit-{k}", root / split / f"digit-{k}")
    incoming = tmp_path / "project" / "incoming" / "digit-8"
    shutil.copytree(folder / "train" / "digit-8", incoming)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    write_params(project, data={"source": "imagefolder", "root": str(root), "shards": True, "shard_images": 8},
                 backbone=BACKBONE, registry={"gate": {"min_A_last": None, "max_forgetting": None,
                                                       "min_newest_task_accuracy": None, "min_base_accuracy": None}})
    first = run_stages(project)["registration"]
    tracking.configure()
    tracking.approve("promptcil", first["version"], reviewer="test")
    result = retrain(str(project))
    assert result["status"] == "registered" and result["new_classes"] == ["digit-8"]
    version = MlflowClient().get_model_version("promptcil", result["version"])
    assert version.tags["review"] == "pending"


def test_the_nvjpeg_path_assembles_the_same_batches(tmp_path: Path, folder: Path) -> None:
    """The GPU decode path's own code (JPEGs as one decode_jpeg call, PNGs decoded first, the batch stacked
    and resized) run with decode_jpeg's CPU device: the same batches as the threads' per-image decode. The
    nvjpeg kernel itself needs a GPU (tests/test_data.py's CUDA tests, bench/data_scale.py)."""
    from promptcil.data.shards import _ShardReader

    data = read_image_set(prepared(tmp_path, folder, shards=True, image_size=24).of("prepare"), "train")
    rows = list(range(len(data)))
    via_batch, labels = _ShardReader(data, gpu=torch.device("cpu"))[rows]
    one_by_one, same_labels = _ShardReader(data)[rows]
    assert via_batch.shape == (len(data), 3, 24, 24) and torch.equal(labels, same_labels)
    assert torch.equal(via_batch, one_by_one)


def test_a_cpu_share_of_the_gpu_path_picks_each_image_the_same_way_and_assembles_the_same_batches(
        tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.decode_cpu_share: that share of the JPEGs leaves the nvjpeg call for the CPU decoder, each image
    picked by its place in its shard (the same in a task's subset as in the whole split), and the batches
    are the ones the GPU path assembles without it (run here with decode_jpeg's CPU device)."""
    from promptcil.data import shards
    from promptcil.data.shards import _ShardReader

    on_cpu: list[int] = []
    decode_cpu = shards._decode_cpu
    monkeypatch.setattr(shards, "_decode_cpu", lambda data, payload, i, size: on_cpu.append(i) or decode_cpu(
        data, payload, i, size))

    whole = read_image_set(prepared(tmp_path, folder, shards=True, image_size=24).of("prepare"), "train")
    rows = list(range(len(whole)))
    assert whole.cpu_decoded(rows) == [False] * len(rows)  # the default: every JPEG by nvjpeg
    half = whole.with_loading("gpu", None, cpu_share=0.5)
    picked = half.cpu_decoded(rows)
    assert 0.25 * len(rows) < sum(picked) < 0.75 * len(rows)
    odd = rows[1::2]
    assert half.take(torch.tensor(odd)).cpu_decoded(list(range(len(odd)))) == [picked[r] for r in odd]

    together, labels = _ShardReader(whole, gpu=torch.device("cpu"))[rows]
    not_jpeg = len(on_cpu)  # decoded on the CPU whatever the share
    split, same_labels = _ShardReader(half, gpu=torch.device("cpu"))[rows]
    assert 0 < len(on_cpu) - 2 * not_jpeg <= sum(picked)  # the picked JPEGs went to the CPU decoder
    assert torch.equal(labels, same_labels) and torch.equal(split, together)


def test_decode_auto_uses_the_loader_threads_when_there_are_enough_of_them(tmp_path: Path, folder: Path) -> None:
    """decode auto on CUDA: nvjpeg with fewer than 8 loader threads, the threads with 8 or more (measured
    faster inside a pass: docs/performance.md); cpu and gpu as asked; never nvjpeg for CPU batches."""
    from promptcil.data.shards import gpu_decode

    data = read_image_set(prepared(tmp_path, folder, shards=True, image_size=24).of("prepare"), "train")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the choice only: nothing runs on the device
    assert not gpu_decode(data.with_loading("auto", 8), cuda) and not gpu_decode(data.with_loading("auto", 16), cuda)
    assert gpu_decode(data.with_loading("auto", 4), cuda) and gpu_decode(data.with_loading("gpu", 16), cuda)
    assert not gpu_decode(data.with_loading("cpu", 2), cuda) and not gpu_decode(data.with_loading("auto", 2), cpu)
    with pytest.raises(DataError, match="data.decode: gpu needs a CUDA device"):
        gpu_decode(data.with_loading("gpu", 2), cpu)


def test_a_cpu_share_outside_zero_to_one_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.decode_cpu_share"):
        make_params(data={"decode_cpu_share": 1.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("cpu_share", [0.0, 0.5])
def test_nvjpeg_batches_match_the_cpu_decode_while_the_gpu_is_busy(tmp_path: Path, folder: Path,
                                                                    cpu_share: float) -> None:
    """decode gpu (nvjpeg on each loader thread's own stream; with `cpu_share`, half the JPEGs by the CPU
    decoder beside it) against decode cpu: the same labels and, up to the two decoders' rounding, the same
    pixels. Each batch is copied on the consuming stream behind a queued matmul chain and then dropped, with no
    synchronisation until the end: a batch whose memory went back to the loader's stream too early (no
    record_stream) would be overwritten by a later decode before its copy ran."""
    data = read_image_set(prepared(tmp_path, folder, shards=True, image_size=24).of("prepare"), "train")
    cuda = torch.device("cuda")
    reference = list(device_batches(data.with_loading("cpu", 2), 8, cuda))
    busy = torch.randn(2048, 2048, device=cuda)
    kept = []
    for images, labels in device_batches(data.with_loading("gpu", 2, cpu_share), 8, cuda):
        for _ in range(20):
            busy = busy @ busy / busy.norm()
        kept.append((images.clone(), labels.clone()))
        del images, labels
    assert len(kept) == len(reference)
    for (images, labels), (expected, expected_labels) in zip(kept, reference):
        assert torch.equal(labels, expected_labels)
        assert (images.float() - expected.float()).abs().mean() < 2.0
