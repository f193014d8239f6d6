"""Formula-driven pretraining images: renderings of random iterated function systems (FractalDB-style).

After Kataoka et al., "Pre-training without Natural Images" (ACCV 2020) and the follow-ups on
formula-driven supervised learning for ViTs: a class is an iterated function system (IFS), a few
random contractive affine maps of the plane; its images are chaos-game renderings of that system,
each with its own small jitter of the map parameters. No natural image, no downstream class and
no data licence is involved, so a backbone pretrained on them can ship anywhere.

Everything is regenerated from `FractalConfig` (the pipeline versions those parameters, never the
images). Class k's system and images are drawn from one generator seeded by (seed, k) alone, so
adding classes or images per class leaves the existing classes' systems unchanged. All random
numbers come from CPU generators; only the arithmetic runs on the device, vectorised over every
image of a batch, so CUDA and CPU render the same images up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from promptcil.config import FractalConfig
from promptcil.data.sources import DataError, ImageSet

FILTER_SIZE = 32
"""Side of the canvas the filter renders on: fixed, so a class's system does not depend on backbone.img_size."""
FILTER_POINTS = 4096
"""Chaos-game points of the filter's rendering (4 per pixel of the filter canvas)."""
MIN_MAP_WEIGHT = 0.01
"""Floor of a map's |det| when choosing maps: a singular map still belongs to the attractor and must be visited."""
CANDIDATES_PER_ROUND = 16
"""Systems drawn per class and round of filtering: one round nearly always finds a system that passes
(most do), and the filter's sequential game costs the same for 1 or 16 candidates."""
MAX_SYSTEM_DRAWS = 256
"""Systems drawn for one class before giving up on the filter."""
RENDER_BUDGET = {"cpu": 1 << 22, "cuda": 1 << 25}
"""Images x points rendered at once, about 64 bytes each (parameters, points, pixel indices): 256 MiB
of host memory, 2 GiB on a GPU, where larger batches mean fewer steps of the sequential game."""


@dataclass(frozen=True)
class IteratedFunctionSystem:
    """Affine maps (x, y) -> (a x + b y + e, c x + d y + f), one row (a, b, c, d, e, f) per map."""

    maps: torch.Tensor
    """(n, 6) float64."""

    @property
    def probabilities(self) -> torch.Tensor:
        """How often the chaos game picks each map: proportional to |det| (the area it keeps), as in FractalDB."""
        a, b, c, d = self.maps[:, :4].unbind(1)
        weight = (a * d - b * c).abs().clamp_min(MIN_MAP_WEIGHT)
        return weight / weight.sum()


def class_generator(seed: int, class_index: int) -> torch.Generator:
    """The CPU generator all of one class's random numbers come from, mixed from (seed, class index)."""
    state = np.random.SeedSequence([seed, class_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def contraction_bound(jitter: float) -> float:
    """Largest singular value a drawn map may have so that it stays contractive after any jitter.

    A jitter multiplies each entry of the linear part A by a factor in [1 - j, 1 + j], i.e. adds
    A∘E with |E| <= j entrywise, and ||A∘E||_2 <= ||A∘E||_F <= j ||A||_F <= j sqrt(2) ||A||_2.
    """
    return 1.0 / (1.0 + math.sqrt(2.0) * jitter)


def sample_system(generator: torch.Generator, min_maps: int, max_maps: int, jitter: float) -> IteratedFunctionSystem:
    """FractalDB's draw: min..max maps with every parameter uniform in [-1, 1], kept only when contractive.

    A map whose linear part is not contractive enough (see `contraction_bound`) is redrawn on its
    own, so the attractor exists for the system and for every jittered rendering of it.
    """
    count = int(torch.randint(min_maps, max_maps + 1, (), generator=generator))
    bound = contraction_bound(jitter)
    maps: list[torch.Tensor] = []
    while len(maps) < count:
        candidate = torch.rand(6, generator=generator, dtype=torch.float64) * 2 - 1
        if torch.linalg.matrix_norm(candidate[:4].view(2, 2), ord=2) < bound:
            maps.append(candidate)
    return IteratedFunctionSystem(torch.stack(maps))


def chaos_game(maps: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """Points of the chaos game, one game per image, all images in lockstep.

    Args:
        maps: (B, n, 6) per-image maps (rows a, b, c, d, e, f), on the device the game runs on.
        choices: (T, B) index of the map each image applies at each step.

    Returns:
        (T, 2, B) points, step-major so that each step reads and writes contiguous rows. Each
        game starts at the fixed point of its map 0, which lies on the attractor, so no burn-in
        steps are thrown away.
    """
    steps, batch = choices.shape
    a, b, c, d, e, f = maps[:, 0].unbind(1)
    det = (1 - a) * (1 - d) - b * c  # > 0: I - A is invertible when A is contractive
    x = ((1 - d) * e + b * f) / det
    y = (c * e + (1 - a) * f) / det
    # Every step's parameters gathered at once (one indexing op instead of one per step):
    # per step, the loop is then four fused multiply-adds into the output.
    index = choices.to(maps.device, torch.int64).unsqueeze(0).expand(6, steps, batch)
    per_step = maps.permute(2, 1, 0).gather(1, index)  # (6, T, B)
    points = torch.empty(steps, 2, batch, dtype=maps.dtype, device=maps.device)
    for step in range(steps):
        a, b, c, d, e, f = per_step[:, step]
        new_x, new_y = points[step]
        torch.addcmul(e, a, x, out=new_x).addcmul_(b, y)
        torch.addcmul(f, c, x, out=new_y).addcmul_(d, y)
        x, y = new_x, new_y
    return points


def hit_counts(points: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 2, B) points -> (B, size, size) points per pixel, each shape scaled to fill the canvas.

    The scale is the larger side of the shape's bounding box (aspect ratio kept, so a line stays
    a line) and the shape is centred.
    """
    lo, hi = points.amin(0), points.amax(0)  # (2, B)
    scale = (hi - lo).amax(0).clamp_min(1e-12)
    centred = (points - (lo + hi) / 2) / scale  # in [-1/2, 1/2]
    pixels = ((centred + 0.5) * (size - 1)).round().long().clamp_(0, size - 1)
    batch = points.shape[2]
    flat = (torch.arange(batch, device=points.device) * size + pixels[:, 1]) * size + pixels[:, 0]
    return torch.bincount(flat.flatten(), minlength=batch * size * size).view(batch, size, size)


def filled_fractions(systems: list[IteratedFunctionSystem], generators: list[torch.Generator]) -> torch.Tensor:
    """Fraction of the FILTER_SIZE canvas each system's attractor covers (the papers' filling rate).

    Runs on the CPU in float64 whatever the device, so which systems pass never depends on it;
    the systems' games run together (in chunks), each drawing its map choices from its own generator.
    """
    choices = torch.stack([
        torch.multinomial(system.probabilities, FILTER_POINTS, replacement=True, generator=generator)
        for system, generator in zip(systems, generators, strict=True)
    ], dim=1)
    maps = torch.zeros(len(systems), max(s.maps.shape[0] for s in systems), 6, dtype=torch.float64)
    for i, system in enumerate(systems):
        maps[i, : system.maps.shape[0]] = system.maps
    chunk = RENDER_BUDGET["cpu"] // FILTER_POINTS
    return torch.cat([
        (hit_counts(chaos_game(maps[i : i + chunk], choices[:, i : i + chunk]), FILTER_SIZE) > 0).double().mean((1, 2))
        for i in range(0, len(systems), chunk)
    ])


def class_systems(cfg: FractalConfig, generators: list[torch.Generator]) -> list[IteratedFunctionSystem]:
    """One system per class: the first, in its generator's order, that passes the filter.

    Each round draws CANDIDATES_PER_ROUND candidates for every class still without a system and
    filters them all at once; a class's draws come from its own generator only, so its system does
    not depend on how many classes there are.
    """
    systems: dict[int, IteratedFunctionSystem] = {}
    pending = list(range(len(generators)))
    for _ in range(MAX_SYSTEM_DRAWS // CANDIDATES_PER_ROUND):
        owners = [k for k in pending for _ in range(CANDIDATES_PER_ROUND)]
        candidates = [sample_system(generators[k], cfg.min_maps, cfg.max_maps, cfg.jitter) for k in owners]
        filled = filled_fractions(candidates, [generators[k] for k in owners])
        for k, system, fraction in zip(owners, candidates, filled.tolist(), strict=True):
            if k not in systems and fraction >= cfg.min_filled_fraction:
                systems[k] = system
        pending = [k for k in pending if k not in systems]
        if not pending:
            return [systems[k] for k in range(len(generators))]
    raise DataError(
        f"backbone.pretrain.fractal.min_filled_fraction: no system for class {pending[0]} covered "
        f"{cfg.min_filled_fraction} of the canvas in {MAX_SYSTEM_DRAWS} draws; lower it"
    )


def grey_levels(counts: torch.Tensor) -> torch.Tensor:
    """Hit counts -> grey levels in 0..1: log density, so both the dense core and sparse tips show."""
    peak = counts.flatten(1).amax(1).clamp_min(1).view(-1, 1, 1)
    return torch.log1p(counts.float()) / torch.log1p(peak.float())


def fractal_images(
    cfg: FractalConfig, image_size: int, device: torch.device | str = "cpu", *, progress: bool = True
) -> ImageSet:
    """`cfg.classes` × `cfg.images_per_class` uint8 images of `image_size` px, labelled by system.

    Per class (from its own generator, in this order): the system, drawn until it passes the
    filter; per image the jitter factors, the chaos game's map choices and, for colour, a colour.
    """
    device = torch.device(device)
    n, maps_max = cfg.images_per_class, cfg.max_maps
    all_maps = torch.zeros(cfg.classes * n, maps_max, 6, dtype=torch.float64)
    all_choices = torch.empty(cfg.points, cfg.classes * n, dtype=torch.uint8)
    colours = torch.empty(cfg.classes * n, 3)
    generators = [class_generator(cfg.seed, k) for k in range(cfg.classes)]
    for k, (system, generator) in enumerate(zip(class_systems(cfg, generators), generators, strict=True)):
        count = system.maps.shape[0]
        factors = 1 + cfg.jitter * (torch.rand(n, count, 6, generator=generator, dtype=torch.float64) * 2 - 1)
        rows = slice(k * n, (k + 1) * n)
        all_maps[rows, :count] = system.maps * factors
        # Draws are i.i.d., so viewing them step-major is as valid as image-major and skips a transpose.
        all_choices[:, rows] = torch.multinomial(
            system.probabilities, cfg.points * n, replacement=True, generator=generator
        ).view(cfg.points, n)
        if cfg.colour:
            colour = torch.rand(n, 3, generator=generator) * 0.8 + 0.2
            colours[rows] = colour / colour.amax(1, keepdim=True)  # brightest channel at full scale
    channels = 3 if cfg.colour else 1
    images = torch.empty(cfg.classes * n, channels, image_size, image_size, dtype=torch.uint8)
    with Progress(TextColumn("[bold]fractals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as bar:
        bar_id = bar.add_task("fractals", total=len(images))
        chunk = max(1, RENDER_BUDGET.get(device.type, RENDER_BUDGET["cpu"]) // cfg.points)
        for start in range(0, len(images), chunk):
            rows = slice(start, start + chunk)
            maps = all_maps[rows].to(device, torch.float32)
            grey = grey_levels(hit_counts(chaos_game(maps, all_choices[:, rows]), image_size))[:, None]
            if cfg.colour:
                grey = grey * colours[rows].to(device)[:, :, None, None]
            images[rows] = (grey * 255).round().to(torch.uint8).cpu()
            bar.advance(bar_id, maps.shape[0])
    width = max(3, len(str(cfg.classes - 1)))
    return ImageSet(
        images=images,
        labels=torch.arange(cfg.classes).repeat_interleave(n),
        class_names=[f"fractal_{k:0{width}d}" for k in range(cfg.classes)],
    )
