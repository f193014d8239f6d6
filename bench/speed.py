"""GPU speed harness (issue 7): promptcil's stages against what the hardware allows, in one run.

Every number is a ratio to a baseline measured in the same process on the same inputs:
  plain         the frozen backbone's forward (method `none`): the inference baseline;
  limit         forward + backward to one vector added to the tokens entering block 0: the
                least work any prompt method's training step can do, since the backbone
                takes no weight gradients: the training baseline.
Each registered prompt method (every name in promptcil.prompts.METHODS except `none`) runs the
trainer's own step (IncrementalTrainer.train_step: autocast, masked cross-entropy, backward,
Adam) and the evaluation's inference (IncrementalModel.predict under autocast), both from uint8
images already on the device. The `features` stage runs promptcil.features.backbone_statistics
end to end from uint8 images in host memory through the real loader. Time per incremental task
runs IncrementalTrainer.run on equal tasks. Random weights and random images: speed does not
depend on the values, but never time on zeros.

    python bench/speed.py                 # the device run: ViT-B/16 + ViT-S/16, 224 px, bf16, batch 256
    python bench/speed.py --quick         # CPU smoke test: a tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's library, also where promptcil is not installed

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from promptcil.backbone import load_backbone  # noqa: E402
from promptcil.config import BackboneConfig, HeadConfig, MethodConfig, TrainConfig  # noqa: E402
from promptcil.data import ImageSet, TaskSplit, make_loader  # noqa: E402
from promptcil.features import backbone_statistics  # noqa: E402
from promptcil.heads import create_head  # noqa: E402
from promptcil.metrics import gflops_per_image  # noqa: E402
from promptcil.model import IncrementalModel  # noqa: E402
from promptcil.prompts import METHODS, PromptMethod, create_method  # noqa: E402
from promptcil.prompts.base import trunc_normal_parameter  # noqa: E402
from promptcil.runtime import autocast_for, resolve_device  # noqa: E402
from promptcil.train import IncrementalTrainer  # noqa: E402

HEAD_CLASSES, FIRST_CLASS = 20, 10  # a step of task 1 of 10 + 10 classes: old logits are masked, as in every later task
INPUT_BUFFERS = 4  # batches rotated through, so no step re-reads the previous one's input from cache
QUICK_BACKBONE = {"img_size": 32, "patch_size": 4, "depth": 2}  # a 2-block vit_tiny at 32 px: seconds on a CPU


class InputPrompt(PromptMethod):
    """The training baseline: one learned vector added to every token entering block 0.

    Its gradient needs the backward through every block (activation gradients only), which is
    what every prompt method pays at least; deliberately not registered as a method.
    """

    method_name = "limit"

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__(backbone)
        self.input_prompt = trunc_normal_parameter(self.embed_dim, std=0.02)

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.input_prompt.to(tokens.dtype) if index == 0 else tokens


@dataclass
class Run:
    """What the command line decided, shared by every measurement."""

    device: torch.device
    batch_size: int
    backbone_overrides: dict[str, int]
    steps: int
    repeats: int
    warmup: int

    def backbone(self, name: str) -> VisionTransformer:
        cfg = BackboneConfig(name=name, source="random", **self.backbone_overrides)
        return load_backbone(cfg).to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---- timing -----------------------------------------------------------------------------------


def measure(run: Run, step: Callable[[int], object], images_per_step: int) -> dict[str, Any]:
    """Throughput of `step(i)` (i picks the input buffer), peak memory, and the first call's time.

    The first call (compilation, library handles) is timed alone, then `warmup` more calls, then
    `repeats` groups of steps/repeats calls, each group timed as a whole (CUDA events around it,
    so gaps between steps count), and the median group gives the rate. No host sync inside a group.
    """
    cuda = run.device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(run.device)
        resting = torch.cuda.memory_allocated(run.device)
    run.sync()
    start = time.perf_counter()
    step(0)
    run.sync()
    first_call_s = time.perf_counter() - start
    for i in range(1, run.warmup + 1):
        step(i)
    per_group = max(1, run.steps // run.repeats)
    seconds: list[float] = []
    i = run.warmup + 1
    for _ in range(run.repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(per_group):
                step(i)
                i += 1
            end.record()
            end.synchronize()
            seconds.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            for _ in range(per_group):
                step(i)
                i += 1
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result: dict[str, Any] = {
        "img_per_s": per_group * images_per_step / median,
        "ms_per_step": median / per_group * 1e3,
        "spread": (max(seconds) - min(seconds)) / median,  # (slowest - fastest group) / median group
        "first_call_s": first_call_s,
        "timed_steps": per_group * run.repeats,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(run.device)
        result["peak_mib"] = peak / 2**20
        result["step_mib"] = (peak - resting) / 2**20  # what the step needs beyond weights and inputs
    return result


def report(model: str, label: str, r: dict[str, Any]) -> None:
    memory = f", step {r['step_mib']:.0f} MiB" if "step_mib" in r else ""
    print(f"  {model}: {label}: {r['img_per_s']:.0f} img/s ({r['ms_per_step']:.1f} ms/step{memory})", flush=True)


@dataclass
class Batches:
    """INPUT_BUFFERS random uint8 batches (and labels of the simulated task) resident on the device."""

    images: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    def random(cls, run: Run, channels: int, size: tuple[int, int], seed: int = 0) -> "Batches":
        generator = torch.Generator().manual_seed(seed)
        shape = (run.batch_size, channels, *size)
        images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(INPUT_BUFFERS)]
        labels = [torch.randint(FIRST_CLASS, HEAD_CLASSES, (run.batch_size,), generator=generator)
                  for _ in range(INPUT_BUFFERS)]
        return cls([x.to(run.device) for x in images], [y.to(run.device) for y in labels])

    def pick(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i % INPUT_BUFFERS], self.labels[i % INPUT_BUFFERS]


def build_model(run: Run, backbone: VisionTransformer, method: PromptMethod) -> IncrementalModel:
    """Method + linear head (grown to HEAD_CLASSES) on the shared backbone; attaching is the constructor's."""
    head = create_head(HeadConfig(), backbone.embed_dim)
    head.add_classes(HEAD_CLASSES)
    return IncrementalModel(backbone, method, head).to(run.device)


def method_config(name: str) -> MethodConfig:
    """The method's defaults, with VPT pinned to the issue's deep N=10 whatever the defaults become."""
    return MethodConfig.model_validate({"name": name, "vpt": {"length": 10, "deep": True}})


def train_rate(run: Run, model: IncrementalModel, batches: Batches, scratch: Path) -> dict[str, Any]:
    """The rate of train_step's step."""
    return measure(run, train_step(run, model, batches, scratch), run.batch_size)


def train_step(run: Run, model: IncrementalModel, batches: Batches, scratch: Path) -> Callable[[int], None]:
    """Step i: the trainer's own step on batch i of task 1 (labels FIRST_CLASS.., earlier logits masked)."""
    split = TaskSplit(class_order=list(range(HEAD_CLASSES)), task_sizes=[FIRST_CLASS, HEAD_CLASSES - FIRST_CLASS])
    trainer = IncrementalTrainer(model, split, TrainConfig(batch_size=run.batch_size), scratch, run.device,
                                 progress=False)
    optimizer = trainer.make_optimizer(model.trainable_parameters())
    model.method.attach()
    model.train()

    def step(i: int) -> None:
        trainer.train_step(model.head, *batches.pick(i), FIRST_CLASS, optimizer)

    return step


def inference_rate(run: Run, model: IncrementalModel, batches: Batches) -> dict[str, Any]:
    """The evaluation's path: IncrementalModel.predict (uint8 in, labels out) under the library's autocast."""
    model.method.attach()
    model.eval()

    def step(i: int) -> None:
        with autocast_for(run.device):
            model.predict(batches.pick(i)[0])

    return measure(run, step, run.batch_size)


def gflops(model: IncrementalModel, batches: Batches) -> float:
    """Forward GFLOPs per image as the evaluate stage counts them (the model on uint8 images)."""
    model.method.attach()
    model.eval()
    return gflops_per_image(model, batches.images[0][:2])


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (graph breaks add graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextmanager
def recorded(key: str, errors: dict[str, str]) -> Iterator[None]:
    """Run one measurement; a failure is written down under `key` and the run goes on to the next one."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (one broken variant must not cost the whole device run)
        errors[key] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        print(f"  ! {key}: {errors[key]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- sections ---------------------------------------------------------------------------------


def bench_model(run: Run, name: str, features_batches: int, scratch: Path) -> dict[str, Any]:
    """Inference, training step, GFLOPs and memory of plain/limit/every method, and the features stage."""
    torch.manual_seed(0)
    backbone = run.backbone(name)
    batches = Batches.random(run, backbone.patch_embed.proj.in_channels, tuple(backbone.patch_embed.img_size))
    out: dict[str, Any] = {
        "backbone": {"name": name, "img_size": list(backbone.patch_embed.img_size), "embed_dim": backbone.embed_dim,
                     "depth": len(backbone.blocks), "params_m": sum(p.numel() for p in backbone.parameters()) / 1e6},
        "inference": {}, "train": {}, "gflops": {}, "errors": {},
    }
    errors = out["errors"]
    plain = build_model(run, backbone, create_method(method_config("none"), backbone))
    with recorded("plain", errors):
        out["inference"]["plain"] = inference_rate(run, plain, batches)
        out["gflops"]["plain"] = gflops(plain, batches)
        report(name, "plain inference", out["inference"]["plain"])
    with recorded("limit", errors):
        out["train"]["limit"] = train_rate(run, build_model(run, backbone, InputPrompt(backbone)), batches, scratch)
        report(name, "limit train", out["train"]["limit"])
    for method in (m for m in METHODS if m != "none"):
        with recorded(method, errors):
            bench_method(run, name, backbone, method, batches, scratch, out)
    with recorded("features", errors):
        plain.method.attach()  # backbone_statistics runs the bare backbone: no other method's hooks on it
        out["features"] = features_rate(run, backbone, features_batches)
        print(f"  {name}: features stage {out['features']['img_per_s']:.0f} img/s, "
              f"loader alone {out['features']['loader_img_per_s']:.0f} img/s", flush=True)
    del plain, batches, backbone
    release(run)
    return out


def bench_compiled(run: Run, name: str, scratch: Path, out: dict[str, Any]) -> None:
    """torch.compile of plain inference and of APT (training step and inference), into out["compiled"]."""
    torch.manual_seed(0)
    backbone = run.backbone(name)
    batches = Batches.random(run, backbone.patch_embed.proj.in_channels, tuple(backbone.patch_embed.img_size))
    out["compiled"] = {}
    for variant, method in (("plain", "none"), ("apt", "apt")):
        if method in METHODS:
            with recorded(f"{variant} compiled", out["errors"]):
                out["compiled"][variant] = compiled_rates(run, name, backbone, method, batches, scratch)
    del batches, backbone
    release(run)


def release(run: Run) -> None:
    """Free the last section's tensors, so each section's peak memory is its own."""
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def bench_method(run: Run, name: str, backbone: VisionTransformer, method: str, batches: Batches, scratch: Path,
                 out: dict[str, Any]) -> None:
    """A method's training step, then (as after a task: APT's merged prompt) its inference and GFLOPs."""
    torch.manual_seed(0)
    model = build_model(run, backbone, create_method(method_config(method), backbone))
    out["train"][method] = train_rate(run, model, batches, scratch)
    report(name, f"{method} train", out["train"][method])
    model.method.end_task()
    out["inference"][method] = inference_rate(run, model, batches)
    report(name, f"{method} inference", out["inference"][method])
    out["gflops"][method] = gflops(model, batches)


def compiled_rates(run: Run, name: str, backbone: VisionTransformer, method: str, batches: Batches,
                   scratch: Path) -> dict[str, Any]:
    """The method's forward compiled in place (nn.Module.compile, so the trainer's step and predict call it
    unchanged): the training step (not for `none`, which has nothing to train) and inference.
    first_call_s includes the compilation; graphs counts what torch.compile built (graph breaks add graphs)."""
    torch.manual_seed(0)
    model = build_model(run, backbone, create_method(method_config(method), backbone))
    model.method.compile()
    result: dict[str, Any] = {}
    if method != "none":
        graphs = dynamo_graphs()
        result["train"] = train_rate(run, model, batches, scratch) | {"graphs": dynamo_graphs() - graphs}
        report(name, f"{method} train, compiled", result["train"])
        model.method.end_task()
    graphs = dynamo_graphs()
    result["inference"] = inference_rate(run, model, batches) | {"graphs": dynamo_graphs() - graphs}
    report(name, f"{method} inference, compiled", result["inference"])
    return result


def random_imageset(count: int, channels: int, size: tuple[int, int], labels: torch.Tensor, seed: int) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, *size), dtype=torch.uint8, generator=generator)
    return ImageSet(images, labels, [str(c) for c in range(int(labels.max()) + 1)])


def features_rate(run: Run, backbone: VisionTransformer, batches: int) -> dict[str, Any]:
    """backbone_statistics (the features stage) end to end from uint8 images in host memory, wall clock,
    median of 3 passes after a 2-batch warm-up, over `batches` batches (the target's row: a stage runs over
    a whole training set) and over a quarter of them (what a fixed cost per call weighs on a short pass);
    the loader alone (host gather, pinning, copy to device); and a breakdown (features_breakdown)."""
    count = batches * run.batch_size
    size = tuple(backbone.patch_embed.img_size)
    data = random_imageset(count, backbone.patch_embed.proj.in_channels, size, torch.zeros(count, dtype=torch.int64), 1)
    quarter = max(1, batches // 4) * run.batch_size
    short = ImageSet(data.images[:quarter], data.labels[:quarter], data.class_names)
    warm = ImageSet(data.images[: 2 * run.batch_size], data.labels[: 2 * run.batch_size], data.class_names)
    backbone_statistics(backbone, warm, run.batch_size, run.device)
    stage_s = [wall(run, lambda: backbone_statistics(backbone, data, run.batch_size, run.device)) for _ in range(3)]
    short_s = [wall(run, lambda: backbone_statistics(backbone, short, run.batch_size, run.device)) for _ in range(3)]

    def load_all() -> None:
        for images, _ in make_loader(data, run.batch_size, shuffle=False, seed=0, pin_memory=run.device.type == "cuda"):
            images.to(run.device, non_blocking=True)

    load_all()
    loader_s = [wall(run, load_all) for _ in range(3)]
    breakdown = features_breakdown(run, backbone, data)
    breakdown["short_pass"] = quarter / statistics.median(short_s)
    return {"img_per_s": count / statistics.median(stage_s), "loader_img_per_s": count / statistics.median(loader_s),
            "images": count, "seconds": stage_s, "breakdown": breakdown}


@torch.no_grad()
def features_breakdown(run: Run, backbone: VisionTransformer, data: ImageSet) -> dict[str, float]:
    """Where the features stage's time goes (img/s, wall clock, median of 3 passes over the same images):
    - loader_fed_forward: the plain forward fed by the stage's loader, each batch copied to the device on
      the compute stream (no copy ahead), nothing kept;
    - with_block_means: the same plus the stage's per-block patch-token means, kept on the device;
    - device_outputs: the stage's whole work with its results kept on the device and copied to (pageable)
      host memory once at the end, instead of through the stage's ring of page-locked staging buffers."""
    from promptcil.backbone import embed_tokens
    from promptcil.data import DevicePreprocess

    preprocess = DevicePreprocess.from_model(backbone).to(run.device)
    prefix, pin = backbone.num_prefix_tokens, run.device.type == "cuda"
    count, depth, dim = len(data), len(backbone.blocks), backbone.embed_dim

    def passes(keep_means: bool, to_host: bool) -> None:
        cls_out = torch.empty((count, dim), device=run.device)
        block_out = torch.empty((count, depth, dim), device=run.device)
        start = 0
        for images, _ in make_loader(data, run.batch_size, shuffle=False, seed=0, pin_memory=pin):
            with autocast_for(run.device):
                tokens = embed_tokens(backbone, preprocess(images.to(run.device, non_blocking=True)))
                means = []
                for block in backbone.blocks:
                    if keep_means:
                        means.append(tokens[:, prefix:].mean(dim=1))
                    tokens = block(tokens)
                cls = backbone.forward_head(backbone.norm(tokens), pre_logits=True)
            stop = start + cls.shape[0]
            if keep_means:
                cls_out[start:stop] = cls
                block_out[start:stop] = torch.stack(means, dim=1)
            start = stop
        if to_host:
            cls_out.cpu(), block_out.cpu()

    rates = {}
    for key, keep, host in (("loader_fed_forward", False, False), ("with_block_means", True, False),
                            ("device_outputs", True, True)):
        passes(keep, host)
        rates[key] = count / statistics.median(wall(run, lambda: passes(keep, host)) for _ in range(3))
    return rates


def wall(run: Run, fn: Callable[[], object]) -> float:
    run.sync()
    start = time.perf_counter()
    fn()
    run.sync()
    return time.perf_counter() - start


def bench_tasks(run: Run, name: str, task_counts: list[int], images_per_task: int, scratch: Path) -> dict[str, Any]:
    """Wall time per task of IncrementalTrainer.run (APT, linear head, 1 epoch) with T equal tasks of
    `images_per_task` images: rehearsal-free training touches only the new task's data, so it must
    not grow with T nor along a run. Task 0 (first calls) is kept out of the medians."""
    backbone = run.backbone(name)
    size = tuple(backbone.patch_embed.img_size)
    channels = backbone.patch_embed.proj.in_channels
    classes_per_task = 2
    one_task = random_imageset(images_per_task, channels, size, torch.zeros(images_per_task, dtype=torch.int64), 2)
    out: dict[str, Any] = {"model": name, "images_per_task": images_per_task, "epochs": 1, "method": "apt",
                           "runs": {}}
    for tasks in task_counts:
        # the same random images in every task (only speed is measured), each task with its own labels
        labels = torch.cat([t * classes_per_task + torch.arange(images_per_task) % classes_per_task
                            for t in range(tasks)])
        data = ImageSet(one_task.images.repeat(tasks, 1, 1, 1), labels,
                        [str(c) for c in range(tasks * classes_per_task)])
        split = TaskSplit(class_order=list(range(tasks * classes_per_task)), task_sizes=[classes_per_task] * tasks)
        torch.manual_seed(0)
        model = IncrementalModel(backbone, create_method(method_config("apt"), backbone),
                                 create_head(HeadConfig(), backbone.embed_dim))
        stamps: list[float] = []

        def task_done(task: int, epoch: int) -> None:
            run.sync()
            stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            cfg = TrainConfig(epochs=1, batch_size=run.batch_size)
            trainer = IncrementalTrainer(model, split, cfg, Path(folder), run.device, progress=False,
                                         on_epoch_end=task_done)
            run.sync()
            start = time.perf_counter()
            trainer.run(data, resume=False)
        task_s = [b - a for a, b in zip([start, *stamps], stamps)]
        later = task_s[1:] or task_s
        quarter = max(1, len(later) // 4)
        out["runs"][str(tasks)] = {
            "task_s": task_s,
            "median_s": statistics.median(later),
            "img_per_s": images_per_task / statistics.median(later),
            # late tasks against early ones within the run (tasks 1.. only)
            "growth": statistics.median(later[-quarter:]) / statistics.median(later[:quarter]),
        }
        print(f"  tasks={tasks}: {statistics.median(later):.3f} s/task (task 0: {task_s[0]:.3f} s)", flush=True)
        del data, model, trainer
        release(run)
    medians = [r["median_s"] for r in out["runs"].values()]
    out["spread_across_runs"] = max(medians) / min(medians)
    out["growth_in_longest_run"] = out["runs"][str(max(task_counts))]["growth"]
    return out


# ---- targets, table, output -------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A ratio the harness checks: measured value within [low, high] (either bound may be open)."""

    name: str
    low: float | None = None
    high: float | None = None

    @property
    def needed(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:.2f} .. {self.high:.2f}"
        return f">= {self.low:.2f}" if self.low is not None else f"<= {self.high:.2f}"

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


APT_TRAIN = Target("APT train step / fwd+bwd limit", low=0.90)
APT_INFERENCE = Target("APT inference / plain forward", low=0.95)
APT_FLOPS = Target("APT GFLOPs / plain", high=1.01)
L2P_FLOPS = Target("L2P GFLOPs / plain (about 2x)", low=1.8, high=2.5)
FEATURES = Target("features stage / plain forward", low=0.90)
APT_MEMORY = Target("APT train step memory / limit", high=1.10)
TASKS_ACROSS = Target("time per task: slowest / fastest task count", high=1.10)
TASKS_ALONG = Target("time per task: late / early tasks, longest run", high=1.10)


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    a, b = a or {}, b or {}
    return a[key] / b[key] if key in a and b.get(key) else None


def flops_ratio(flops: dict[str, float], method: str) -> float | None:
    return flops[method] / flops["plain"] if method in flops and flops.get("plain") else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    measured: list[tuple[Target, str, float | None]] = []
    for name, m in results["models"].items():
        inference, train, flops = m["inference"], m["train"], m["gflops"]
        measured += [
            (APT_TRAIN, name, ratio(train.get("apt"), train.get("limit"), "img_per_s")),
            (APT_INFERENCE, name, ratio(inference.get("apt"), inference.get("plain"), "img_per_s")),
            (APT_FLOPS, name, flops_ratio(flops, "apt")),
            (L2P_FLOPS, name, flops_ratio(flops, "l2p")),
            (FEATURES, name, ratio(m.get("features"), inference.get("plain"), "img_per_s")),
            # the step's own memory (activations, gradients), beyond the weights and inputs both hold
            (APT_MEMORY, name, ratio(train.get("apt"), train.get("limit"), "step_mib")),
        ]
    tasks = results.get("tasks") or {}
    if "spread_across_runs" in tasks:
        measured += [(TASKS_ACROSS, tasks["model"], tasks["spread_across_runs"]),
                     (TASKS_ALONG, tasks["model"], tasks["growth_in_longest_run"])]
    return [{"target": t.name, "model": model, "value": value, "needed": t.needed, "pass": t.check(value)}
            for t, model, value in measured]


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"### {meta['device_name']} · torch {meta['torch']} · timm {meta['timm']} · {meta['date']}"
        + (f" · commit {meta['commit']}" if meta.get("commit") else "")
        + (f" · code {meta['code']}" if meta.get("code") else ""),
        "",
        f"batch {meta['batch_size']}, {meta['dtype']}, {meta['timed_steps']} timed steps after {meta['warmup']} "
        f"warm-up (median of {meta['repeats']} groups; spread = (slowest - fastest group) / median); "
        "random weights and images",
        "",
        "| model | row | img/s | × baseline | spread | ms/step | step MiB | peak MiB | GFLOPs/img | × plain GFLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        inf, tr, fl = m["inference"], m["train"], m["gflops"]
        plain, limit = inf.get("plain", {}), tr.get("limit", {})

        def row(label: str, r: dict[str, Any], base: dict[str, Any], flops: str = "") -> None:
            spread = f"{r['spread']:.0%}" if "spread" in r else ""
            lines.append(
                f"| {name} | {label} | {fmt(r.get('img_per_s'), 0)} | {fmt(ratio(r, base, 'img_per_s'))} | {spread} | "
                f"{fmt(r.get('ms_per_step'), 1)} | {fmt(r.get('step_mib'), 0)} | {fmt(r.get('peak_mib'), 0)} | "
                f"{fmt(fl.get(flops))} | {fmt(flops_ratio(fl, flops))} |"
            )

        row("plain forward (inference baseline)", plain, plain, "plain")
        row("fwd+bwd limit (training baseline)", limit, limit)
        for method in (k for k in tr if k != "limit"):
            row(f"{method} train step (× limit)", tr[method], limit)
            row(f"{method} inference (× plain)", inf.get(method, {}), plain, method)
        if "features" in m:
            f = m["features"]
            row("features stage, uint8 host → device (× plain)", f, plain)
            row("loader alone: gather, pin, copy (× plain)", {"img_per_s": f["loader_img_per_s"]}, plain)
            for key, label in (("loader_fed_forward", "plain forward fed by the loader"),
                               ("with_block_means", "… + per-block token means (on device)"),
                               ("device_outputs", "… + results kept on device, one copy to host"),
                               ("short_pass", "features stage, a quarter of the batches")):
                if key in f.get("breakdown", {}):
                    row(f"{label} (× plain)", {"img_per_s": f["breakdown"][key]}, plain)
        for variant, c in m.get("compiled", {}).items():
            eager_train, eager_inf = tr.get(variant, {}), inf.get(variant, {})
            if "train" in c:
                row(f"{variant} train step, compiled (× eager; {c['train']['graphs']} graphs, "
                    f"first call {c['train']['first_call_s']:.0f} s)", c["train"], eager_train)
            row(f"{variant} inference, compiled (× eager; {c['inference']['graphs']} graphs, "
                f"first call {c['inference']['first_call_s']:.0f} s)", c["inference"], eager_inf)
        for key, message in m["errors"].items():
            lines.append(f"| {name} | {key}: FAILED | {message} | | | | | | | |")
    tasks = results.get("tasks")
    if tasks and tasks.get("runs"):
        lines += ["", f"Time per task: {tasks['model']}, APT + linear head, {tasks['images_per_task']} images per task, "
                      "1 epoch, IncrementalTrainer.run (task 0 kept out of the medians)", "",
                  "| tasks | median s/task | img/s | task 0 s | late / early tasks |", "|---:|---:|---:|---:|---:|"]
        for count, r in tasks["runs"].items():
            lines.append(f"| {count} | {r['median_s']:.3f} | {r['img_per_s']:,.0f} | {r['task_s'][0]:.3f} | "
                         f"{r['growth']:.2f} |")
    if tasks and tasks.get("error"):
        lines += ["", f"Time per task FAILED: {tasks['error']}"]
    lines += ["", "| target | model | measured | needed | result |", "|---|---|---:|---|---|"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {t['model']} | {fmt(t['value'], 3)} | {t['needed']} | {verdict} |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_digest() -> str:
    """The first 12 hex of a SHA-256 over the harness's and the library's Python files (paths and contents):
    it names the code that ran where git's metadata cannot (a copy of the checkout on another machine may
    carry stale git metadata). `python bench/speed.py --code-digest` prints the checkout's."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "src" / "promptcil").rglob("*.py"), *(REPO / "bench").glob("*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="promptcil speed harness: plain/limit baselines, every prompt method's training step and "
        "inference, GFLOPs, peak memory, the features stage and time per task, in one run; writes "
        "speed-<date>-<device>.json and prints markdown tables with PASS/MISS per target.",
    )
    p.add_argument("--models", type=comma_list, default="vit_base_patch16_224,vit_small_patch16_224",
                   help="comma-separated timm ViT names, random weights (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=16, help="must match the models' names (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per measurement, after the warm-up (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="the timed steps are split into this many groups, each "
                   "timed as a whole; the median group gives the rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first call (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure torch.compile of plain inference and of APT (train step, inference) on the "
                   "first model of --models, after everything else (default: on with CUDA, off on CPU)")
    p.add_argument("--features-batches", type=int, default=96,
                   help="batches in the features stage's pass (default: %(default)s)")
    p.add_argument("--task-model", default="vit_small_patch16_224",
                   help="model of the time-per-task runs (default: %(default)s)")
    p.add_argument("--tasks", type=lambda s: [int(t) for t in comma_list(s)], default="5,10,20",
                   help="comma-separated task counts of the time-per-task runs; '' skips them (default: %(default)s)")
    p.add_argument("--images-per-task", type=int, default=4096,
                   help="training images per task, 1 epoch (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a 2-block vit_tiny at 32 px (ignores --img-size/--patch-size); the other "
                   "defaults become batch 4, 4 timed steps, 3 feature batches, tasks 2,4 of 16 images")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder of the JSON result (default: bench/results)")
    p.add_argument("--table", type=Path, metavar="JSON", help="only print the markdown tables of a saved result")
    p.add_argument("--code-digest", action="store_true",
                   help="only print the digest of this checkout's code, to match against a result's meta.code")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(models="vit_tiny_patch16_224", task_model="vit_tiny_patch16_224", batch_size=4, steps=4,
                       repeats=2, warmup=1, features_batches=3, tasks="2,4", images_per_task=16)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.code_digest:
        code = code_digest()
        print(code)
        return {"code": code}
    if args.table is not None:
        results = json.loads(args.table.read_text())
        print(markdown(results))
        return results
    started = time.perf_counter()
    device = resolve_device(args.device)
    overrides = QUICK_BACKBONE if args.quick else {"img_size": args.img_size, "patch_size": args.patch_size}
    run = Run(device, args.batch_size, overrides, args.steps, args.repeats, args.warmup)
    compiled = device.type == "cuda" if args.compile is None else args.compile
    now = datetime.now(timezone.utc)
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"speed-{now:%Y%m%d-%H%M%S}-{slug}.json"
    results: dict[str, Any] = {
        "meta": {
            "device_name": name, "device": str(device), "torch": torch.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "code": code_digest(), "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            "batch_size": args.batch_size, "backbone_overrides": overrides, "timed_steps": args.steps // args.repeats
            * args.repeats, "repeats": args.repeats, "warmup": args.warmup, "compile": compiled, "quick": args.quick,
            "methods": [m for m in METHODS if m != "none"], "argv": sys.argv[1:],
        },
        "models": {}, "tasks": {}, "targets": [],
    }

    def save(section: str, section_start: float) -> None:
        """Write what is measured so far (a run cut short keeps it) and say how long the section took."""
        now = time.perf_counter()
        results["meta"]["wall_s"] = now - started
        results["targets"] = targets(results)
        path.write_text(json.dumps(results, indent=2))
        print(f"[{section}: {now - section_start:.0f} s, {now - started:.0f} s in all]", flush=True)

    print(f"{name}, torch {torch.__version__}: writing {path}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            section_start = time.perf_counter()
            results["models"][model] = bench_model(run, model, args.features_batches, Path(scratch))
            save(model, section_start)
        if args.tasks:
            section_start = time.perf_counter()
            try:
                results["tasks"] = bench_tasks(run, args.task_model, args.tasks, args.images_per_task, Path(scratch))
            except Exception as err:  # noqa: BLE001  (keep the rest of the device run)
                results["tasks"] = {"model": args.task_model, "error": f"{type(err).__name__}: {err}"}
            save("time per task", section_start)
        if compiled:  # last: the slowest section (compilation), and the least needed if the run is cut short
            model = args.models[0]
            section_start = time.perf_counter()
            bench_compiled(run, model, Path(scratch), results["models"][model])
            save(f"{model} compiled", section_start)
    print()
    print(markdown(results))
    print(f"\n{path} ({results['meta']['wall_s']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    main()
