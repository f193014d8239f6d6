"""One model's section: the baselines (plain, limit), every method, torch.compile; a failure is recorded, not fatal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.prompts import METHODS, create_method

from harness.features_stage import features_rate
from harness.inputs import Batches, Run
from harness.models import InputPrompt, build_model, method_config
from harness.steps import dynamo_graphs, gflops, inference_rate, train_rate
from harness.timing import release


def print_rate(model: str, label: str, r: dict[str, Any]) -> None:
    """A measurement's progress line."""
    memory = f", step {r['step_mib']:.0f} MiB" if "step_mib" in r else ""
    print(f"  {model}: {label}: {r['img_per_s']:.0f} img/s ({r['ms_per_step']:.1f} ms/step{memory})", flush=True)


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
        print_rate(name, "plain inference", out["inference"]["plain"])
    with recorded("limit", errors):
        out["train"]["limit"] = train_rate(run, build_model(run, backbone, InputPrompt(backbone)), batches, scratch)
        print_rate(name, "limit train", out["train"]["limit"])
    for method in (m for m in METHODS if m != "none"):
        with recorded(method, errors):
            bench_method(run, name, backbone, method, batches, scratch, out)
    with recorded("features", errors):
        plain.method.attach()  # class_statistics runs the bare backbone: no other method's hooks on it
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


def bench_method(run: Run, name: str, backbone: VisionTransformer, method: str, batches: Batches, scratch: Path,
                 out: dict[str, Any]) -> None:
    """A method's training step, then (as after a task: APT's merged prompt) its inference and GFLOPs."""
    torch.manual_seed(0)
    model = build_model(run, backbone, create_method(method_config(method), backbone))
    out["train"][method] = train_rate(run, model, batches, scratch)
    print_rate(name, f"{method} train", out["train"][method])
    model.method.end_task()
    out["inference"][method] = inference_rate(run, model, batches)
    print_rate(name, f"{method} inference", out["inference"][method])
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
        print_rate(name, f"{method} train, compiled", result["train"])
        model.method.end_task()
    graphs = dynamo_graphs()
    result["inference"] = inference_rate(run, model, batches) | {"graphs": dynamo_graphs() - graphs}
    print_rate(name, f"{method} inference, compiled", result["inference"])
    return result
