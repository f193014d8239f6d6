"""Sharded images for sources too large for memory: WebDataset tar shards of the encoded files, an index of
where each image's bytes are, and a loader that reads a batch's bytes and decodes them on the GPU (nvjpeg)
or in loader threads.

Why this layout (docs/operations.md, "Data larger than memory"; measured in docs/performance.md):
- Tar shards in WebDataset's layout (`<class>/<n>.jpg` + `<class>/<n>.path`): plain files DVC versions one
  by one, so a new class folder adds shards and leaves every other shard's cache entry alone; any WebDataset
  reader streams them too.
- The encoded bytes, not decoded pixels: a 224 px JPEG is ~10-30 KB against 150 KB of uint8, so the shards are
  5-15x smaller and decoding is the loader's work, where it runs in parallel.
- Read by offset (an index of shard, offset, size, label per image: 32 bytes each), not streamed in file
  order: every epoch sees the same seeded global order the in-memory loader uses, each rank its contiguous
  part of every global batch, so N processes, a resume and an in-memory run all see the same batches.
Host memory holds the index and a bounded number of batches in flight, whatever the number of images; the
files' pages are the OS's cache, not the process's.

One shard holds images of one class (at most `data.shard_images`): a task's loader opens only its classes'
shards.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from promptcil.artifacts import ArtifactKind, load_tensors, save_tensors, sha256_file
from promptcil.errors import DataError

SHARD_DIR = "shards"
JPEG_MAGIC = b"\xff\xd8"


def index_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.shards.safetensors"


@dataclass
class ShardedImageSet:
    """The images of a split as shards on disk: what `ImageSet` is for data in memory (labels, class names,
    `take`, `first`); `promptcil.data.device_batches` streams either."""

    folder: Path
    """The prepare stage's output folder (shard paths are relative to it)."""
    shards: list[str]
    shard: torch.Tensor
    """(N,) int64: each image's shard (an index into `shards`)."""
    offset: torch.Tensor
    """(N,) int64: where its encoded bytes start in the shard."""
    size: torch.Tensor
    """(N,) int64: how many bytes."""
    labels: torch.Tensor
    """(N,) int64, incremental labels (prepare applies the class order)."""
    class_names: list[str]
    image_size: int
    """Every image comes out at image_size x image_size (stretched, as the in-memory imagefolder source)."""
    decode: str = "auto"
    """auto (nvjpeg when the batches go to a GPU and fewer than CPU_DECODE_THREADS loader threads run, else the
    threads), cpu (in the loader's threads), gpu (nvjpeg)."""
    workers: int | None = None
    """Loader threads (default: min(8, CPUs), the CPUs shared among a machine's torchrun processes)."""
    cpu_share: float = 0.0
    """With GPU decoding: the share of JPEGs decoded in the loader's threads instead (`cpu_decoded`)."""

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows: torch.Tensor | slice) -> ShardedImageSet:
        return replace(self, shard=self.shard[rows], offset=self.offset[rows], size=self.size[rows],
                       labels=self.labels[rows])

    def first(self, n: int) -> torch.Tensor:
        """The first `n` images decoded on the CPU: (n, 3, S, S) uint8 (examples, FLOP counts)."""
        return _ShardReader(self)[list(range(min(n, len(self))))][0]

    def with_loading(self, decode: str, workers: int | None, cpu_share: float = 0.0) -> ShardedImageSet:
        return replace(self, decode=decode, workers=workers, cpu_share=cpu_share)

    def cpu_decoded(self, rows: list[int]) -> list[bool]:
        """Which of `rows` the GPU path leaves to the CPU decoder: `cpu_share` of the images, each picked by its
        place in its shard (a multiplicative hash of shard and tar block), so an image is decoded the same way
        in every batch, epoch, subset, resume and rank split."""
        if self.cpu_share <= 0:
            return [False] * len(rows)
        key = (self.shard[rows] * 0x9E3779B1 + self.offset[rows] // 512 * 0x85EBCA77) % (1 << 32)
        return (key < int(self.cpu_share * (1 << 32))).tolist()


# ---------------------------------------------------------------- writing (the prepare stage)


def write_shards(folder: Path, split: str, files: dict[str, list[Path]], class_order: list[int], image_size: int,
                 shard_images: int, source: str, *, progress: bool = False) -> dict[str, Any]:
    """Check and pack the files of the classes in `class_order` (indices into `files`; label k is class_order[k])
    into shards under `folder/shards/<split>/`, then write the index. Every file is decoded
    once to check it; a file that does not decode stops the stage naming it, and nothing is left (the shards
    are written to a temporary folder that replaces the split's only when all are done). Returns the index's
    manifest."""
    names = list(files)
    label_of = {original: label for label, original in enumerate(class_order)}
    jobs = []  # (label, class name, shard number within the class, files)
    for original, name in enumerate(names):  # the source's order, as the in-memory layout keeps its images
        if original in label_of:
            for start in range(0, len(files[name]), shard_images):
                jobs.append((label_of[original], name, start // shard_images, files[name][start:start + shard_images]))
    final = Path(folder) / SHARD_DIR / split
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{split}."))
    try:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool, Progress(  # decoding to check: every core
                TextColumn(f"[bold]{split} shards"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                TimeElapsedColumn(), disable=not progress, transient=True) as bar:
            bar_id = bar.add_task(split, total=sum(len(paths) for *_, paths in jobs))
            members = []
            for packed in pool.map(_pack_shard, [staging / name / f"{n:05d}.tar" for _, name, n, _ in jobs],
                                   [paths for *_, paths in jobs], [name for _, name, _, _ in jobs]):
                members.append(packed)  # (each image's offset and size, the shard's sha256)
                bar.advance(bar_id, len(packed[0]))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shard, offset, size, labels, shards = [], [], [], [], []
    for number, ((label, name, n, _), (entries, digest)) in enumerate(zip(jobs, members)):
        shards.append({"path": f"{SHARD_DIR}/{split}/{name}/{n:05d}.tar", "images": len(entries), "sha256": digest})
        for start, length in entries:
            shard.append(number)
            offset.append(start)
            size.append(length)
            labels.append(label)
    return save_tensors(index_file(folder, split), {
        "shard": torch.tensor(shard, dtype=torch.int64), "offset": torch.tensor(offset, dtype=torch.int64),
        "size": torch.tensor(size, dtype=torch.int64), "labels": torch.tensor(labels, dtype=torch.int64)},
        kind=ArtifactKind.IMAGE_DATA,
        metadata={"class_names": [names[c] for c in class_order], "source": source, "image_size": image_size,
                  "shards": shards})


def _pack_shard(path: Path, files: list[Path], class_name: str) -> tuple[list[tuple[int, int]], str]:
    """Write one shard of `files` (one class) with WebDataset's TarWriter; returns each image's (offset, size)
    and the shard's sha256 (hashed here, in parallel with the other shards, while its pages are cached)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime fixed: the same files make the same bytes (the clock by default), so a rerun of prepare is not a new
    # data version for DVC's cache or for the stages after it
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for number, file in enumerate(files):
            payload, extension = checked_payload(file)
            key = f"{class_name}/{number:06d}"
            # the original file, relative to data.root, for messages about this image
            sink.write({"__key__": key, extension: payload, "path": "/".join(file.parts[-3:]).encode()})
    with tarfile.open(path) as tar:
        entries = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
    return entries, sha256_file(path)


def checked_payload(file: Path) -> tuple[bytes, str]:
    """The bytes a shard keeps for `file`: a JPEG as it is when it decodes (RGB or greyscale, no EXIF
    rotation); anything else decoded as the in-memory source decodes it (Pillow: 16-bit, palette, EXIF
    orientation) and stored as PNG, which is lossless. A file that does not decode raises DataError naming it."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.io import ImageReadMode, decode_jpeg, encode_png

    from promptcil.data.sources.base import one_line, read_rgb_image

    data = file.read_bytes()
    if data[:2] == JPEG_MAGIC:
        try:
            with Image.open(file) as header:  # the header only: mode and EXIF orientation
                plain = header.mode in ("RGB", "L") and header.getexif().get(0x0112, 1) == 1
            if plain:
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                return data, "jpg"
        except (OSError, RuntimeError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"data.root: cannot read image {file}: {one_line(err)}") from err
    rgb = torch.from_numpy(read_rgb_image(file, None).copy()).permute(2, 0, 1).contiguous()
    return encode_png(rgb).numpy().tobytes(), "png"


# ---------------------------------------------------------------- reading


def read_shards(folder: Path, split: str) -> ShardedImageSet:
    tensors, manifest = load_tensors(index_file(folder, split), kind=ArtifactKind.IMAGE_DATA)
    meta = manifest["metadata"]
    return ShardedImageSet(Path(folder), [s["path"] for s in meta["shards"]], tensors["shard"], tensors["offset"],
                           tensors["size"], tensors["labels"], meta["class_names"], meta["image_size"])


def verify_shards(folder: Path, split: str) -> None:
    """sha256 of every shard against the index (a tampered or truncated shard names itself)."""
    _, manifest = load_tensors(index_file(folder, split), kind=ArtifactKind.IMAGE_DATA)
    for shard in manifest["metadata"]["shards"]:
        path = Path(folder) / shard["path"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            raise DataError(f"shard {path} is missing or differs from its index (sha256): run the prepare stage again")


CPU_DECODE_THREADS = 8
"""decode auto decodes in the loader's threads when it has at least this many, else with nvjpeg. Measured on an
H200 host (16 CPUs, ViT-B/16, 200,000 224 px JPEGs, docs/performance.md): nvjpeg alone feeds 28,000 img/s and 8
threads 12,400, but inside the features pass the threads gave 7,971 img/s and nvjpeg 7,297: torchvision's GPU
decoder does not overlap the model's work on the same GPU nearly as well as threads on other cores do."""


def gpu_decode(data: ShardedImageSet, device: torch.device) -> bool:
    """Whether nvjpeg decodes: decode gpu; decode auto on CUDA with fewer than CPU_DECODE_THREADS loader threads."""
    if data.decode == "gpu" and device.type != "cuda":
        raise DataError(f"data.decode: gpu needs a CUDA device, the batches go to {device}")
    if device.type != "cuda" or data.decode == "cpu":
        return False
    return data.decode == "gpu" or loader_threads(data) < CPU_DECODE_THREADS


def loader_threads(data: ShardedImageSet) -> int:
    return data.workers if data.workers is not None else default_loader_threads()


def sharded_batches(data: ShardedImageSet, batches: Iterable[list[int]], device: torch.device,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 (B, 3, S, S), labels) on `device` for each list of indices in `batches`. Loader threads read the
    bytes and decode them, with libjpeg-turbo or, on the GPU, with nvjpeg: both release the GIL, so threads
    decode in parallel, and the decoding (nvjpeg's host-side part included) overlaps the model's work queued
    by this thread, without worker processes to start, feed or fork from a process full of threads (Prefect's,
    Dask's). At most `workers` + 2 batches are in flight."""
    from promptcil.data.loader import to_device_ahead

    on_gpu = gpu_decode(data, device)
    workers = loader_threads(data)
    reader = _ShardReader(data, pin=device.type == "cuda", gpu=device if on_gpu else None)
    if not on_gpu:
        yield from to_device_ahead(_read_ahead(reader.__getitem__, batches, workers), device)
        return
    streams = threading.local()

    def on_side_stream(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        # torchvision's nvjpeg call makes the calling thread's current stream wait for the decode: on the default
        # stream that would hold back the model's kernels queued meanwhile, so each loader thread has its own
        if not hasattr(streams, "stream"):
            streams.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(streams.stream):
            images, labels = reader[batch]
            done = torch.cuda.Event()
            done.record()
        return images, labels, done

    for images, labels, done in _read_ahead(on_side_stream, batches, workers):
        stream = torch.cuda.current_stream(device)
        stream.wait_event(done)
        images.record_stream(stream)  # made on the loader's stream, read on this one: the allocator must know
        labels.record_stream(stream)
        yield images, labels


def default_loader_threads() -> int:
    """Eight threads, or the CPUs this process may use if fewer, shared among the processes torchrun started on
    this machine. Measured on an H200 host (16 CPUs, 224 px JPEGs, decode cpu, the loader alone): 8 threads
    12,400 img/s, 15 threads 11,200 (docs/performance.md)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _read_ahead(load: Callable[[list[int]], Any], batches: Iterable[list[int]], workers: int) -> Iterator[Any]:
    """load(batch) for each batch in order, `workers` threads ahead."""
    if workers == 0:
        yield from (load(batch) for batch in batches)
        return
    todo = iter(batches)
    with ThreadPoolExecutor(workers, thread_name_prefix="promptcil-loader") as pool:
        pending = deque(pool.submit(load, batch) for batch in islice(todo, workers + 2))
        try:
            while pending:
                done = pending.popleft().result()
                following = next(todo, None)
                if following is not None:
                    pending.append(pool.submit(load, following))
                yield done
        finally:  # an abandoned or failed pass: drop what was queued, wait only for what is running
            for future in pending:
                future.cancel()


class _ShardReader:
    """A whole batch per list of indices: the batch's bytes read into one buffer, each image with one pread from
    its shard (file handles opened once, shared by the threads), decoded on the CPU (into pinned memory with
    `pin`) or, with `gpu`, by nvjpeg on that device. The per-image work in Python is kept to a few list
    operations: the loader's threads share the interpreter with the thread that runs the model."""

    def __init__(self, data: ShardedImageSet, pin: bool = False, gpu: torch.device | None = None) -> None:
        self.data, self.pin, self.gpu = data, pin, gpu
        self._files: dict[int, int] = {}
        self._opening = threading.Lock()

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is not None:
            return fd
        with self._opening:
            if shard not in self._files:
                self._files[shard] = os.open(self.data.folder / self.data.shards[shard], os.O_RDONLY)
            return self._files[shard]

    def __del__(self) -> None:
        for fd in self._files.values():
            os.close(fd)

    def _read(self, indices: list[int]) -> tuple[list[torch.Tensor], list[bool]]:
        """Each image's encoded bytes (views of one buffer) and whether they are a JPEG."""
        shards, offsets = self.data.shard[indices].tolist(), self.data.offset[indices].tolist()
        sizes = self.data.size[indices].tolist()
        buffer = bytearray(sum(sizes))
        view, start, jpeg = memoryview(buffer), 0, []
        for shard, offset, size in zip(shards, offsets, sizes):
            if os.preadv(self._fd(shard), [view[start:start + size]], offset) != size:
                raise DataError(f"shard {self.data.folder / self.data.shards[shard]} is shorter than its index: "
                                "run the prepare stage again")
            jpeg.append(buffer[start:start + 2] == JPEG_MAGIC)
            start += size
        return list(torch.frombuffer(buffer, dtype=torch.uint8).split(sizes)), jpeg

    def __getitem__(self, indices: list[int]) -> Any:
        payloads, jpeg = self._read(indices)
        labels = self.data.labels[indices]
        if self.gpu is not None:  # nvjpeg takes the JPEGs but the CPU's share; others (PNG) are decoded on the CPU
            payloads = [p if is_jpeg and not cpu else _decode_cpu(self.data, p, i, None)
                        for p, i, is_jpeg, cpu in zip(payloads, indices, jpeg, self.data.cpu_decoded(indices))]
            return _decode_on_gpu(self.data, payloads, indices, self.gpu), labels.to(self.gpu)
        size = self.data.image_size
        images = [_decode_cpu(self.data, p, i, size) for p, i in zip(payloads, indices)]
        out = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=self.pin)
        return torch.stack(images, out=out), labels  # pinned: the copy to the GPU runs asynchronously


def _decode_cpu(data: ShardedImageSet, payload: torch.Tensor, i: int, size: int | None) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(payload, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise _undecodable(data, i, err) from err
    return image if size is None else resize_one(image, size)


def _decode_on_gpu(data: ShardedImageSet, payloads: list[torch.Tensor], indices: list[int],
                   device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [k for k, p in enumerate(payloads) if p.ndim == 1]
    images: list[torch.Tensor] = [p.to(device, non_blocking=True) if p.ndim == 3 else p for p in payloads]
    if encoded:
        try:
            decoded = decode_jpeg([payloads[k] for k in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # which one: each on the CPU, to name it
            for k in encoded:
                _decode_cpu(data, payloads[k], indices[k], None)
            raise
        for k, image in zip(encoded, decoded):
            images[k] = image
    size = data.image_size
    if all(image.shape[-2:] == images[0].shape[-2:] for image in images):
        batch = torch.stack(images)  # one size: one resize for the whole batch, none when it is image_size already
        return batch if batch.shape[-1] == size and batch.shape[-2] == size else resize_batch(batch, size)
    return torch.stack([resize_one(image, size) for image in images])


def resize_one(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8, bilinear, antialiased when shrinking (as Pillow does)."""
    if image.shape[-2:] == (size, size):
        return image
    return resize_batch(image.unsqueeze(0), size)[0]


def resize_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    shrinking = batch.shape[-2] > size or batch.shape[-1] > size
    out = F.interpolate(batch.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _undecodable(data: ShardedImageSet, i: int, err: BaseException) -> DataError:
    """Name the original file of image `i` (its `.path` member beside the image in the shard)."""
    from promptcil.data.sources.base import one_line

    shard = data.folder / data.shards[int(data.shard[i])]
    original = "?"
    try:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            for k, member in enumerate(members):
                if member.offset_data == int(data.offset[i]):
                    stem = member.name.rsplit(".", 1)[0]
                    paths = [m for m in members[max(0, k - 2):k + 3] if m.name == f"{stem}.path"]
                    if paths:
                        original = tar.extractfile(paths[0]).read().decode()
                    break
    except (OSError, tarfile.TarError):
        pass
    return DataError(f"cannot decode image {original} in shard {shard}: {one_line(err)}")
