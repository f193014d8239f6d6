"""Where the features stage's time goes: torch.profiler over backbone_statistics (per-image outputs) on uint8 host data.

    python bench/profile_features.py            # ViT-B/16, 224 px, batch 256, 12 batches (a CUDA device)

Prints the top operators by host (CPU) time and by device time, and the stage's rate next to the
bare forward's on the same images already on the device.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from promptcil.backbone import load_backbone
from promptcil.config import BackboneConfig
from promptcil.data import DevicePreprocess, ImageSet
from promptcil.features import backbone_statistics
from promptcil.runtime import autocast_for, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    device = resolve_device("auto")
    backbone = load_backbone(BackboneConfig(name=args.model, source="random", img_size=args.img_size,
                                            patch_size=args.patch_size)).to(device)
    count = args.batch_size * args.batches
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (count, 3, args.img_size, args.img_size), dtype=torch.uint8,
                                  generator=generator),
                    torch.zeros(count, dtype=torch.int64), ["x"])
    backbone_statistics(backbone,
                        ImageSet(data.images[: 2 * args.batch_size], data.labels[: 2 * args.batch_size], ["x"]),
                        args.batch_size, device)  # warm-up: kernels, pinned-memory cache
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    backbone_statistics(backbone, data, args.batch_size, device)
    sync()
    stage_rate = count / (time.perf_counter() - started)
    preprocess = DevicePreprocess.from_model(backbone).to(device)
    on_device = data.images[: args.batch_size].to(device)
    with torch.no_grad(), autocast_for(device):
        backbone.forward_features(preprocess(on_device))
        sync()
        started = time.perf_counter()
        for _ in range(args.batches):
            backbone.forward_features(preprocess(on_device))
        sync()
    forward_rate = count / (time.perf_counter() - started)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        backbone_statistics(backbone, data, args.batch_size, device)
        sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10))
    print(f"features stage {stage_rate:,.0f} img/s; forward on device-resident images {forward_rate:,.0f} img/s; "
          f"ratio {stage_rate / forward_rate:.2f}")


if __name__ == "__main__":
    main()
