"""Data package on real data: sklearn digits, Debian's Fashion-MNIST, a CIFAR-100 archive in the
real format, and ImageFolder trees of real PNG/JPEG files written here."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.datasets import CIFAR100

from promptcil.config import DataConfig
from promptcil.data import (
    SOURCES,
    DataError,
    DevicePreprocess,
    ImageSet,
    TaskSplit,
    device_batches,
    load_split,
    make_loader,
    make_task_split,
    register_source,
    subset,
    to_device_ahead,
)
from promptcil.data.sources import DEBIAN_FASHION_MNIST


@pytest.fixture(scope="module")
def digits_train() -> ImageSet:
    return load_split(DataConfig(), "train", 32)


# ---------------------------------------------------------------- sources: digits


def test_digits_shapes_and_partition(digits_train: ImageSet) -> None:
    test = load_split(DataConfig(), "test", 32)
    for part in (digits_train, test):
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert part.images.shape[1:] == (1, 8, 8)
        assert part.class_names == [str(d) for d in range(10)]
    assert int(digits_train.images.max()) == 255  # 0..16 scaled to the full uint8 range
    assert len(digits_train) + len(test) == 1797
    assert len(test) == pytest.approx(0.25 * 1797, abs=1)

    # The two halves are a partition of the real dataset: same multiset of (image, label).
    bunch = load_digits()
    full = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    expected = Counter((img.tobytes(), int(y)) for img, y in zip(full, bunch.target))
    got = Counter(
        (img.numpy().tobytes(), int(y))
        for part in (digits_train, test)
        for img, y in zip(part.images[:, 0], part.labels)
    )
    assert got == expected

    # Stratified: every class is split in the test fraction (to within one sample).
    for c, n in Counter(bunch.target.tolist()).items():
        assert int((test.labels == c).sum()) == pytest.approx(0.25 * n, abs=1)


def test_digits_split_follows_split_seed(digits_train: ImageSet) -> None:
    again = load_split(DataConfig(), "train", 32)
    other = load_split(DataConfig(split_seed=1), "train", 32)
    assert torch.equal(again.images, digits_train.images) and torch.equal(again.labels, digits_train.labels)
    assert not torch.equal(other.labels, digits_train.labels)


def test_load_split_rejects_bad_split_and_registry_rejects_duplicates() -> None:
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_split(DataConfig(), "validation", 32)  # type: ignore[arg-type]
    assert {"digits", "fashion_mnist", "cifar100", "imagefolder"} <= set(SOURCES)
    with pytest.raises(ValueError, match="'digits' is registered twice"):
        register_source("digits")(SOURCES["digits"])


# ---------------------------------------------------------------- task split


def test_task_split_is_seeded_and_covers_every_class_once() -> None:
    split = make_task_split(10, base_classes=4, classes_per_task=2, seed=1993)
    assert split == make_task_split(10, 4, 2, seed=1993)
    assert split.class_order != make_task_split(10, 4, 2, seed=7).class_order
    assert sorted(split.class_order) == list(range(10))
    assert split.task_sizes == [4, 2, 2, 2] and split.num_tasks == 4
    assert [list(split.task_classes(t)) for t in range(4)] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert split.seen_classes(0) == range(4) and split.seen_classes(2) == range(8)
    # The standard CIFAR-100 order of CIL papers (seed 1993).
    assert make_task_split(100, 50, 10, seed=1993).class_order[:8] == [68, 56, 78, 8, 23, 84, 90, 65]
    # A single task (no incremental classes) is a valid run.
    assert make_task_split(10, 10, 3, seed=0).task_sizes == [10]


def test_task_split_json_round_trip() -> None:
    split = make_task_split(10, 4, 3, seed=0, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert split.class_order == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    restored = TaskSplit.from_dict(json.loads(json.dumps(split.to_dict())))
    assert restored == split
    with pytest.raises(DataError, match="add up to 9, not to the 10 classes"):
        TaskSplit.from_dict({"class_order": list(range(10)), "task_sizes": [4, 5]})
    with pytest.raises(DataError, match="needs class_order and task_sizes"):
        TaskSplit.from_dict({"class_order": [0, 1]})
    with pytest.raises(DataError, match="task 4 does not exist"):
        make_task_split(10, 4, 2, 0).task_classes(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(classes_per_task=4), "data.classes_per_task: 4 does not divide the 6 incremental classes"),
        (dict(base_classes=11), "data.base_classes: 11 exceeds the 10 classes of the data"),
        (dict(base_classes=0), "data.base_classes: 0 leaves task 0 with no classes"),
        (dict(classes_per_task=0), "data.classes_per_task: 0 leaves the incremental tasks with no classes"),
        (dict(class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 12]), r"data.class_order: unknown class ids \[12\]"),
        (dict(class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8]), r"data.class_order: class ids \[8\] appear more than once"),
        (dict(class_order=[0, 1, 2, 3, 4, 5, 6, 7]), r"data.class_order: misses class ids \[8, 9\]"),
    ],
)
def test_task_split_errors_name_the_key(kwargs: dict, message: str) -> None:
    args = dict(num_classes=10, base_classes=4, classes_per_task=2, seed=0) | kwargs
    with pytest.raises(DataError, match=message):
        make_task_split(**args)


def test_relabel_and_subset(digits_train: ImageSet) -> None:
    split = make_task_split(10, 4, 3, seed=5)
    relabelled = split.relabel(digits_train)
    assert relabelled.class_names == [str(c) for c in split.class_order]
    # Incremental label k is original class class_order[k], sample by sample.
    order = torch.tensor(split.class_order)
    assert torch.equal(order[relabelled.labels], digits_train.labels)
    assert torch.equal(relabelled.images, digits_train.images)

    per_task = [subset(relabelled, split.task_classes(t)) for t in range(split.num_tasks)]
    assert sum(len(part) for part in per_task) == len(relabelled)
    for t, part in enumerate(per_task):
        assert set(part.labels.tolist()) == set(split.task_classes(t))  # never another task's sample
        assert part.class_names == relabelled.class_names

    partial = TaskSplit(class_order=[3, 1], task_sizes=[1, 1]).relabel(digits_train)
    assert partial.class_names == ["3", "1"]
    kept = digits_train.labels[torch.isin(digits_train.labels, torch.tensor([1, 3]))]
    assert torch.equal(partial.labels, (kept == 1).long())  # class 3 -> 0, class 1 -> 1; others dropped

    with pytest.raises(DataError, match=r"task has no samples for classes \[10, 11\]"):
        subset(relabelled, range(10, 12))
    with pytest.raises(DataError, match=r"data.class_order: class ids \[12\] are not among the 10 classes"):
        TaskSplit(class_order=[12], task_sizes=[1]).relabel(digits_train)


# ---------------------------------------------------------------- loader


def _epoch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_loader_order_is_a_function_of_the_seed(digits_train: ImageSet) -> None:
    images, labels = _epoch(make_loader(digits_train, 100, shuffle=True, seed=3))
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == digits_train.images.shape
    same_images, same_labels = _epoch(make_loader(digits_train, 100, shuffle=True, seed=3))
    assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
    _, other_labels = _epoch(make_loader(digits_train, 100, shuffle=True, seed=4))
    assert not torch.equal(labels, other_labels)
    assert sorted(labels.tolist()) == sorted(digits_train.labels.tolist())  # each sample exactly once

    # Passes over one loader differ, and a fresh loader with the same seed replays them.
    loader, replay = (make_loader(digits_train, 100, shuffle=True, seed=3),
                      make_loader(digits_train, 100, shuffle=True, seed=3))
    first, second = _epoch(loader)[1], _epoch(loader)[1]
    assert not torch.equal(first, second)
    assert torch.equal(_epoch(replay)[1], first) and torch.equal(_epoch(replay)[1], second)


def test_loader_without_shuffle_keeps_order_and_last_partial_batch(digits_train: ImageSet) -> None:
    batches = list(make_loader(digits_train, 500, shuffle=False, seed=0))
    assert [len(y) for _, y in batches] == [500, 500, len(digits_train) - 1000]
    assert torch.equal(torch.cat([x for x, _ in batches]), digits_train.images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_pinned_loader_gathers_the_same_batches_into_pinned_memory(digits_train: ImageSet) -> None:
    images, labels = _epoch(make_loader(digits_train, 100, shuffle=True, seed=3))
    pinned = list(make_loader(digits_train, 100, shuffle=True, seed=3, pin_memory=True))
    assert all(x.is_pinned() and y.is_pinned() for x, y in pinned)
    assert torch.equal(torch.cat([x for x, _ in pinned]), images)
    # each host batch is dropped while its copy may still run: the pinned cache must not hand it out again early
    on_gpu = [x.to("cuda", non_blocking=True)
              for x, _ in make_loader(digits_train, 100, shuffle=True, seed=3, pin_memory=True)]
    torch.cuda.synchronize()
    assert torch.equal(torch.cat(on_gpu).cpu(), images)


# ---------------------------------------------------------------- device preprocessing


def test_device_preprocess_normalises_and_converts_grey() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = DevicePreprocess(8, mean, std)
    white = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    out = pre(white)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    expected = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out[0, :, 3, 5], expected)
    torch.testing.assert_close(pre(torch.zeros_like(white))[1, :, 0, 0], -torch.tensor(mean) / torch.tensor(std))

    grey = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    rgb = pre(grey) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert rgb.shape == (4, 3, 8, 8)
    torch.testing.assert_close(rgb, (grey.float() / 255).expand(-1, 3, -1, -1))

    with pytest.raises(ValueError, match="expected .* uint8"):
        pre(white.float())


def test_device_preprocess_resizes_only_when_needed() -> None:
    pre = DevicePreprocess(16, [0.0], [1.0], in_chans=1)
    small = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    large = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    assert pre(small).shape == (2, 1, 16, 16) and pre(large).shape == (2, 1, 16, 16)
    # A uniform image stays uniform through up- and antialiased down-sampling.
    torch.testing.assert_close(pre(torch.full((1, 1, 64, 64), 51, dtype=torch.uint8)), torch.full((1, 1, 16, 16), 0.2))
    exact = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(pre(exact), exact.float() / 255, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3-channel images cannot feed a 1-channel model"):
        pre(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_device_preprocess_from_timm_model() -> None:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1, num_classes=0
    )
    pre = DevicePreprocess.from_model(model)
    assert pre.img_size == (32, 32) and pre.in_chans == 3
    torch.testing.assert_close(pre.mean.flatten(), torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float32))
    features = model(pre(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)))
    assert features.shape == (2, model.embed_dim)
    assert "mean" not in pre.state_dict()  # derived from the model, not saved with it

    grey_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1, in_chans=1, num_classes=0
    )
    grey = DevicePreprocess.from_model(grey_model)
    assert grey.in_chans == 1 and grey.mean.shape == (1, 1, 1, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_device_preprocess_runs_on_the_gpu() -> None:
    pre = DevicePreprocess(16, [0.5] * 3, [0.5] * 3)
    out = pre(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8, device="cuda"))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), torch.ones(2, 3, 16, 16))


def test_to_device_ahead_yields_every_batch_in_order(digits_train: ImageSet) -> None:
    """On this CPU a plain copy; on a GPU (test below) the side-stream copies must give the same batches."""
    batches = list(to_device_ahead(make_loader(digits_train, 300, shuffle=True, seed=1), torch.device("cpu")))
    expected = list(make_loader(digits_train, 300, shuffle=True, seed=1))
    assert len(batches) == len(expected) == -(-len(digits_train.labels) // 300)
    assert all(torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(batches, expected))
    # what every loop that feeds a model uses: the same batches, shuffled by the same seed
    fed = list(device_batches(digits_train, 300, torch.device("cpu"), shuffle=True, seed=1))
    assert len(fed) == len(expected)
    assert all(torch.equal(x, ex) and torch.equal(y, ey) for (x, y), (ex, ey) in zip(fed, expected))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_to_device_ahead_copies_on_a_side_stream_without_mixing_batches(digits_train: ImageSet) -> None:
    images, labels = _epoch(make_loader(digits_train, 100, shuffle=True, seed=3))
    seen = []
    for x, y in to_device_ahead(make_loader(digits_train, 100, shuffle=True, seed=3, pin_memory=True),
                                torch.device("cuda")):
        assert x.is_cuda and y.is_cuda
        seen.append((x.float() * 1).to(torch.uint8).cpu())  # work on the compute stream, as a model would
    assert torch.equal(torch.cat(seen), images)


# ---------------------------------------------------------------- sources: fashion_mnist, cifar100


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST} is absent: `apt-get install dataset-fashion-mnist` to run this test",
)
def test_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    cfg = DataConfig(source="fashion_mnist", root=tmp_path)
    train = load_split(cfg, "train", 32)
    test = load_split(cfg, "test", 32)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.class_names[0] == "T-shirt/top" and len(train.class_names) == 10
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]  # decompressed in place, no temp file left behind
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 28 * 28


def _write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-class CIFAR-100 in the real pickled format; torchvision checks md5s, so point it at these files.

    The real files are Python 2 pickles whose byte-string keys torchvision reads back (latin1) as
    str keys, so str keys here give what torchvision sees in the real archive.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024], data[:, 1024:2048] = 10, 20  # R plane, G plane; B stays random
        entry = {"data": data, "fine_labels": [i % 3 for i in range(n)], "coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee", "cloud"]}))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


def test_cifar100_reads_the_real_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar100(tmp_path, monkeypatch)
    cfg = DataConfig(source="cifar100", root=tmp_path)
    train, test = load_split(cfg, "train", 32), load_split(cfg, "test", 32)
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.class_names == ["apple", "bee", "cloud"]
    assert (train.images[:, 0] == 10).all() and (train.images[:, 1] == 20).all()  # CHW, channels in order


def test_cifar100_missing_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root: CIFAR-100 not usable in .*set data.download: true"):
        load_split(DataConfig(source="cifar100", root=tmp_path), "train", 32)


# ---------------------------------------------------------------- sources: imagefolder


def _tree(root: Path) -> None:
    """train/test trees of real files in every mode the loader documents."""
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for name in ("bird", "cat", "dog"):
            (root / part / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / part / "cat" / "rgb.png")
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / part / "dog" / "grey.png")
        Image.new("RGBA", (9, 9), (200, 100, 50, 0)).save(root / part / "bird" / "alpha.png")
    train = root / "train"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(train / "cat" / "photo.jpg", quality=90)
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(train / "cat" / "cmyk.jpg", quality=95)  # pure cyan
    # 16-bit greyscale: 257*v maps to v; 65535 would survive clipping only as 255.
    Image.fromarray(np.full((16, 16), 257 * 100, dtype=np.uint16)).save(train / "dog" / "deep.png")
    Image.new("P", (16, 16), 3).save(train / "bird" / "palette.png")
    (train / "dog" / "notes.txt").write_text("not an image, ignored")


def _pixel(images: ImageSet, names: list[str], file: str) -> list[int]:
    return images.images[names.index(file)][:, 8, 8].tolist()


def test_imagefolder_reads_and_converts_every_mode(tmp_path: Path) -> None:
    _tree(tmp_path)
    train = load_split(DataConfig(source="imagefolder", root=tmp_path), "train", 16)
    files = sorted(p.relative_to(tmp_path / "train").as_posix() for p in (tmp_path / "train").rglob("*.*"))
    files = [f for f in files if not f.endswith(".txt")]  # sorted by class, then by file
    assert train.class_names == ["bird", "cat", "dog"]
    assert train.images.shape == (len(files), 3, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [train.class_names.index(f.split("/")[0]) for f in files]
    assert _pixel(train, files, "dog/deep.png") == [100, 100, 100]  # 16-bit scaled, not clipped
    assert _pixel(train, files, "bird/alpha.png") == [200, 100, 50]  # alpha dropped
    cyan = _pixel(train, files, "cat/cmyk.jpg")
    assert cyan[0] < 10 and cyan[1] > 245 and cyan[2] > 245
    grey = train.images[files.index("dog/grey.png")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])

    test = load_split(DataConfig(source="imagefolder", root=tmp_path, image_size=24), "test", 16)
    assert test.images.shape == (3, 3, 24, 24)  # data.image_size wins over the backbone's size
    assert test.class_names == train.class_names


def test_imagefolder_errors_name_the_problem(tmp_path: Path) -> None:
    def load(root: Path, split: str = "train") -> ImageSet:
        return load_split(DataConfig(source="imagefolder", root=root), split, 16)  # type: ignore[arg-type]

    with pytest.raises(DataError, match=f"data.root: {tmp_path / 'nowhere'} does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(DataError, match="data.root: required for source imagefolder"):
        load_split(DataConfig(source="imagefolder"), "train", 16)

    _tree(tmp_path / "a")
    (tmp_path / "a" / "test" / "cat" / "rgb.png").rename(tmp_path / "a" / "test" / "cat.png")
    (tmp_path / "a" / "test" / "cat").rmdir()
    with pytest.raises(DataError, match=r"test/ classes differ .*missing in test: \['cat'\]"):
        load(tmp_path / "a")

    _tree(tmp_path / "b")
    (tmp_path / "b" / "train" / "emu").mkdir()
    (tmp_path / "b" / "test" / "emu").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/emu has no images"):
        load(tmp_path / "b")

    _tree(tmp_path / "c")
    photo = tmp_path / "c" / "train" / "cat" / "photo.jpg"
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cannot read image .*cat/photo.jpg: image file is truncated"):
        load(tmp_path / "c")

    _tree(tmp_path / "d")
    (tmp_path / "d" / "test" / "cat" / "rgb.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match=r"cannot read image .*test/cat/rgb.png"):
        load(tmp_path / "d", "test")

    (tmp_path / "e" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no test/ folder"):
        load(tmp_path / "e")
