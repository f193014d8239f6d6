"""Issue 11's comparison: which frozen backbone should class-incremental learning start from?

    python bench/backbones.py --quick                          # this CPU: tiny sizes, a smoke run
    python bench/backbones.py --fashion-root DIR --out DIR     # the device: the table for the README

The device machine has no pydantic: carry the wheels of pydantic, pydantic-core, annotated-types,
typing-inspection and typing-extensions (.whl/) and a folder with Fashion-MNIST's four .gz files, then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src python3 bench/backbones.py --fashion-root FOLDER --out $OUT

Backbones: (a) fractal: pretrained on rendered fractals (backbone.pretrain.data: fractal), no natural
image; (b) fashion: pretrained on Fashion-MNIST, its base classes (task 0, the B-N path) in the
Fashion-MNIST protocol and all of it (an upstream data set) in the digits protocol; (c) random: no
pretraining. Protocols: Fashion-MNIST and digits, each 5 tasks of 2 (configs/fractal-*.yaml), so with
(a) and (c) no downstream class is seen before its task. Methods: SimpleCIL (method none, prototype
head) and APT (linear head). Both protocols use one backbone shape, so the fractal backbone is
pretrained once and shared.

Runs the pipeline's stage functions (bench/study.py: no MLflow, Prefect or DVC, which the device
machine lacks) in --work, resumable: finished runs are kept. Writes <out>/backbones.json after every
run and <out>/backbones.md at the end, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from study import REPO, device_name, prepare_protocol, run_variant

from promptcil.config import deep_merge, merged_params, parse_params
from promptcil.data.sources import DEBIAN_FASHION_MNIST, decompress_atomically

PROTOCOLS = {
    "fashion_mnist": REPO / "configs" / "fractal-fashion-mnist.yaml",
    "digits": REPO / "params.yaml",  # the default: fractal pretraining, digits as 5 tasks of 2
}
BACKBONES = ("fractal", "fashion", "random")
METHODS = {
    "SimpleCIL": {"method": {"name": "none"}, "head": {"name": "prototype"}},
    "APT": {"method": {"name": "apt"}, "head": {"name": "linear"}},
}
QUICK: dict[str, Any] = {
    # Tiny everything: checks that every cell of the table is produced, on a 2-core CPU.
    "backbone": {
        "img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "pretrain": {"epochs": 1, "lr": 2e-3, "batch_size": 256,
                     "fractal": {"classes": 8, "images_per_class": 32, "points": 256}},
    },
    "train": {"epochs": 1, "batch_size": 256, "device": "cpu"},
    "eval": {"batch_size": 1024},
}
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def stage_fashion_mnist(source: Path, root: Path) -> Path:
    """Put Fashion-MNIST where the fashion_mnist source reads it (<root>/FashionMNIST/raw/, decompressed)
    from a folder holding the four original files, gzipped or not."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        if (raw / name).exists():
            continue
        if (source / name).is_file():
            shutil.copyfile(source / name, raw / name)
        elif (source / f"{name}.gz").is_file():
            decompress_atomically(source / f"{name}.gz", raw / name)
        else:
            raise SystemExit(f"error: --fashion-root: {source} has neither {name} nor {name}.gz")
    return root


def sizes(quick: bool) -> dict[str, Any]:
    """Model, pretraining and training sizes for both protocols: QUICK, or the Fashion-MNIST preset's
    (its GPU-sized ViT, pretraining budget and fractal set), so that both protocols share one shape."""
    if quick:
        return QUICK
    preset = yaml.safe_load(PROTOCOLS["fashion_mnist"].read_text())
    return {"backbone": preset["backbone"], "train": preset["train"]}


def backbone_overrides(backbone: str, protocol: str) -> dict[str, Any]:
    if backbone == "fractal":
        return {"backbone": {"source": "pretrain", "pretrain": {"data": "fractal"}}}
    if backbone == "random":
        return {"backbone": {"source": "random"}}
    upstream = "base_classes" if protocol == "fashion_mnist" else "fashion_mnist"
    return {"backbone": {"source": "pretrain", "pretrain": {"data": upstream}}}


def pretraining_key(raw: dict[str, Any]) -> str:
    """Names what the pretrain stage's output depends on: its params in dvc.yaml (the backbone section,
    train.seed and train.device), plus the data section when it trains on the base classes."""
    params = parse_params(raw)
    backbone = params.backbone.model_dump(mode="json")
    if params.backbone.pretrain.data in ("base_classes", "fractal"):
        del backbone["pretrain"]["root"]  # only an upstream data set is read from it
    key = {"backbone": backbone, "seed": params.train.seed, "device": params.train.device}
    if params.backbone.source == "pretrain" and params.backbone.pretrain.data == "base_classes":
        key["data"] = params.data.model_dump(mode="json")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def table(study: dict[str, Any]) -> str:
    """Markdown: one line per (protocol, backbone), A_last of each method, what pretraining cost."""
    header = ["protocol", "backbone", "pretrained on", "images", "pretraining s", *(f"{m} A_last" for m in METHODS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in study["cells"]:
        pre = cell["pretraining"]
        seconds = (pre.get("seconds") or 0) + (pre.get("data_seconds") or 0)
        cells = [cell["protocol"], cell["backbone"], str(pre.get("data", "–")), f"{pre.get('train_images') or 0:,}",
                 f"{seconds:.0f}" if pre.get("source") == "pretrain" else "–",
                 *(f"{cell['methods'][m]['A_last']:.3f}" if m in cell["methods"] else "–" for m in METHODS)]
        lines.append("| " + " | ".join(cells) + " |")
    meta = study["meta"]
    lines += ["", f"{meta['device']}, torch {meta['torch']}, {meta['date']}, {meta['sizes']} sizes, seed 0; "
              "pretraining s = rendering/loading the images + training (a copied backbone shows its original's)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke run, minutes)")
    parser.add_argument("--protocol", action="append", choices=list(PROTOCOLS), help="repeatable (default: both)")
    parser.add_argument("--backbone", action="append", choices=BACKBONES, help="repeatable (default: all three)")
    parser.add_argument("--fashion-root", type=Path, default=None,
                        help=f"folder with Fashion-MNIST's four *-ubyte(.gz) files (default: {DEBIAN_FASHION_MNIST})")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: bench/work/backbones[-quick])")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--progress", action="store_true", help="progress bars for pretraining and training")
    args = parser.parse_args()
    label = "quick" if args.quick else "preset"
    work = (args.work or REPO / "bench" / "work" / f"backbones-{label}").resolve()
    protocols, backbones = args.protocol or list(PROTOCOLS), args.backbone or list(BACKBONES)
    common = sizes(args.quick)
    if "fashion_mnist" in protocols or "fashion" in backbones:
        root = str(stage_fashion_mnist(args.fashion_root or DEBIAN_FASHION_MNIST, work / "data"))
        common = deep_merge(common, {"data": {"root": root}, "backbone": {"pretrain": {"root": root}}})

    study: dict[str, Any] = {"meta": {"study": "backbones", "device": device_name(), "torch": torch.__version__,
                                      "date": time.strftime("%Y-%m-%d"), "sizes": label}, "cells": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for protocol in protocols:
        base = deep_merge(merged_params(REPO / "params.yaml", PROTOCOLS[protocol]), common)
        for backbone in backbones:
            raw = deep_merge(base, backbone_overrides(backbone, protocol))
            shared = work / protocol / backbone / "shared"
            cell = {"protocol": protocol, "backbone": backbone, "methods": {},
                    "pretraining": prepare_protocol(shared, raw, args.progress,
                                                    backbone_cache=work / "backbones" / pretraining_key(raw))}
            study["cells"].append(cell)
            for method, overrides in METHODS.items():
                result = run_variant(work / protocol / backbone / method, shared, deep_merge(raw, overrides),
                                     args.progress)
                cell["methods"][method] = result
                print(f"{protocol} {backbone} {method}: A_last {result['A_last']:.3f} "
                      f"({result['run_seconds']:.0f} s)", flush=True)
                (args.out / "backbones.json").write_text(json.dumps(study, indent=1))
    markdown = table(study)
    (args.out / "backbones.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
