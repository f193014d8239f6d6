"""Typed schema of params.yaml.

params.yaml is the single source of configuration for DVC, Prefect and the CLI.
Every section forbids unknown keys, so a typo fails loudly instead of being
ignored; `load_params` turns pydantic's report into one line that names the key
path, e.g. ``params.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params.yaml problem, reported as one line naming the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    source: Literal["digits", "fashion_mnist", "cifar100", "imagefolder"] = Field(
        "digits", description="Where images come from; `digits` is bundled with scikit-learn (offline default)."
    )
    root: Path | None = Field(
        None,
        description="Data folder: torchvision root for fashion_mnist/cifar100, or an ImageFolder tree "
        "with train/ and test/ subfolders (one folder per class) for imagefolder.",
    )
    download: bool = Field(False, description="Let torchvision download fashion_mnist/cifar100 when online.")
    image_size: int | None = Field(
        None, gt=0, description="imagefolder only: images are resized to this square size on load "
        "(defaults to backbone.img_size)."
    )
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="digits only: stratified held-out fraction (digits has no official split)."
    )
    split_seed: int = Field(0, description="digits only: seed of the train/test split.")
    base_classes: int = Field(4, gt=0, description="Classes in task 0 (the 'B' of B-N protocols).")
    classes_per_task: int = Field(2, gt=0, description="Classes in each incremental task after task 0.")
    class_order_seed: int = Field(1993, description="Seed of the class-order permutation.")
    class_order: list[int] | None = Field(
        None, description="Explicit class order (original class ids); overrides class_order_seed."
    )

    @field_validator("class_order")
    @classmethod
    def _order_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("class ids must be unique (a class cannot appear in two tasks)")
        return v


class FractalConfig(Section):
    """Formula-rendered pretraining images (FractalDB-style; see `promptcil.data.fractal`).

    Only these parameters are versioned, never the images: the same values render the same images.
    The defaults are sized for the default tiny ViT at 16 px on a 2-core CPU: 6 400 images render in
    about 2 s and 15 epochs on them (configs/fractal-digits.yaml) take about 30 s. Measured on digits
    (README), more systems, more images and more jitter each gave better frozen features.
    """

    classes: int = Field(64, gt=0, description="Number of classes: one random iterated function system each.")
    images_per_class: int = Field(100, gt=0, description="Renderings of each system, each with its own jitter.")
    min_maps: int = Field(2, ge=2, le=8, description="Fewest affine maps per system (one map's attractor is a point).")
    max_maps: int = Field(4, ge=2, le=8, description="Most affine maps per system (FractalDB draws 2 to 8).")
    jitter: float = Field(
        0.2, ge=0, le=0.5,
        description="Per image, every map parameter is multiplied by 1 + jitter*u, u uniform in [-1, 1] "
        "(FractalDB's intra-class variation); systems are drawn contractive enough to stay contractive after it.",
    )
    points: int = Field(
        1024, gt=0,
        description="Chaos-game iterations per image; about 4 per pixel of backbone.img_size**2 fills the shape.",
    )
    colour: bool = Field(False, description="false: grey images (1 channel); true: RGB, one random colour per image.")
    min_filled_fraction: float = Field(
        0.1, ge=0, lt=1,
        description="The papers' filter: a system whose attractor covers less than this fraction of a 32x32 "
        "canvas (a point, a line) is rejected and redrawn.",
    )
    seed: int = Field(0, ge=0, description="Class k's system and images come from (seed, k) alone.")

    @model_validator(mode="after")
    def _check(self) -> "FractalConfig":
        if self.min_maps > self.max_maps:
            raise ValueError(f"min_maps {self.min_maps} exceeds max_maps {self.max_maps}")
        return self


class PretrainConfig(Section):
    data: Literal["base_classes", "digits", "fashion_mnist", "cifar100", "fractal"] = Field(
        "base_classes",
        description="What the backbone is pretrained on (backbone.source: pretrain). base_classes: task 0 of the "
        "downstream data (the B-N protocol); a source name: ALL classes of that data set's train split, an "
        "'upstream' data set standing in for ImageNet (e.g. fashion_mnist before digits tasks); fractal: images "
        "rendered from random iterated function systems (backbone.pretrain.fractal), no natural image at all.",
    )
    root: Path | None = Field(None, description="Data folder of the upstream source (as data.root; null: data/raw "
                              "or Debian's Fashion-MNIST package).")
    epochs: int = Field(30, gt=0, description="Supervised epochs on the pretraining data.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(64, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    fractal: FractalConfig = FractalConfig()


class BackboneConfig(Section):
    name: str = Field("vit_tiny_patch16_224", description="Any timm ViT model name.")
    source: Literal["hub", "file", "pretrain", "random"] = Field(
        "pretrain",
        description="hub: timm pretrained weights (online); file: local safetensors/torch weights; "
        "pretrain: trained by the pipeline on the base classes, then frozen; random: tests only.",
    )
    file: Path | None = Field(None, description="Weights file for source=file (or a local file for source=hub).")
    img_size: int = Field(32, gt=0, description="Input resolution the ViT runs at.")
    patch_size: int = Field(4, gt=0, description="Patch size; img_size must be divisible by it.")
    embed_dim: int | None = Field(None, gt=0, description="Override the model's width (null: timm default).")
    depth: int | None = Field(None, gt=0, description="Override the number of blocks (null: timm default).")
    num_heads: int | None = Field(None, gt=0, description="Override the number of heads (null: timm default).")
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _check(self) -> "BackboneConfig":
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.source == "file" and self.file is None:
            raise ValueError("source 'file' needs backbone.file")
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        return self


class AptConfig(Section):
    blocks: list[int] | Literal["all"] = Field(
        "all", description="Blocks whose attention gets the additive CLS key/value prompt."
    )
    merge_momentum: float = Field(
        0.7, ge=0, le=1,
        description="c in merged = c*merged + (1-c)*current after each task (paper: 0.7 CIFAR/CUB/Cars, 0.8 ImageNet-R).",
    )
    init_std: float = Field(0.02, gt=0, description="Std of the truncated-normal initial prompt.")


class VptConfig(Section):
    length: int = Field(10, gt=0, description="Prompt tokens per prompted layer (N).")
    deep: bool = Field(True, description="Deep: new tokens at every block; shallow: only at the input.")
    init_std: float = Field(0.02, gt=0)


class L2PConfig(Section):
    pool_size: int = Field(10, gt=0, description="Prompts in the pool.")
    length: int = Field(5, gt=0, description="Tokens per prompt.")
    top_k: int = Field(5, gt=0, description="Prompts chosen per image by key matching.")
    key_loss_weight: float = Field(0.1, ge=0, description="Weight of the query-key matching loss.")
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "L2PConfig":
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k {self.top_k} exceeds pool_size {self.pool_size}")
        return self


class ShipConfig(Section):
    sip_length: int = Field(10, gt=0, description="Semantic Independent Prompt tokens per semantic level.")
    ssp_length: int = Field(10, ge=0, description="Semantic Shared Prompt tokens, inserted at every block (0: off).")
    attribute_layers: int = Field(
        2, ge=0, description="The last anchors (levels) that also get Attribute Prompts (0: off)."
    )
    attribute_length: int = Field(10, gt=0, description="Attribute Prompt tokens per attribute layer.")
    attribute_prototypes: int = Field(
        200, gt=0, description="K: k-means prototypes of the final layer's tokens (task 0's token sample)."
    )
    attribute_weight: float = Field(
        0.1, ge=0, le=1, description="Weight of the matched prototype in an attribute token."
    )
    affinity_threshold: float = Field(
        0.9, gt=-1, le=1,
        description="A block whose mean cosine affinity to the current level's anchor is below this starts a "
        "new level (1: one level per block).",
    )
    decoupled_attention: bool = Field(
        True, description="Image tokens keep their own softmax; prompts enter through a separate one."
    )
    decoupled_scale: float = Field(0.1, ge=0, le=1, description="s: image_out = (1-s)*image + s*prompt attention.")
    matching_loss_weight: float = Field(0.5, ge=0, description="Weight of the prompt-matching loss (0: off).")
    matching_top_k: int = Field(10, gt=0, description="Image tokens most attended by CLS that prompts match.")
    init_std: float = Field(0.02, gt=0)


class MethodConfig(Section):
    name: Literal["apt", "vpt", "l2p", "ship", "none"] = Field(
        "apt", description="Prompt method; `none` is SimpleCIL (frozen features only); ship: SHIP (method.ship)."
    )
    ensemble: int = Field(
        1, gt=0,
        description="Lester's prompt ensembling: K prompts (each with its own head, initialised from a different "
        "seed) trained side by side in one batched forward; predictions = mean of their logits. apt and vpt.",
    )
    apt: AptConfig = AptConfig()
    vpt: VptConfig = VptConfig()
    l2p: L2PConfig = L2PConfig()
    ship: ShipConfig = ShipConfig()

    @model_validator(mode="after")
    def _check(self) -> "MethodConfig":
        if self.ensemble > 1 and self.name not in ("apt", "vpt"):
            raise ValueError(f"ensemble {self.ensemble} needs method apt or vpt, not {self.name}")
        return self


class RidgeConfig(Section):
    projection_dim: int = Field(2048, gt=0, description="Width M of the fixed random projection (RanPAC: 10000 for ViT-B).")
    nonlinearity: Literal["relu", "identity"] = Field("relu", description="Applied after the projection.")
    seed: int = Field(0, description="The projection is regenerated from this seed, never stored.")
    ridge: float | None = Field(
        None, gt=0,
        description="Ridge strength; null: chosen after every task by generalised cross-validation from the "
        "running sums (all data seen so far; exact and order-invariant like the head itself).",
    )


class CatConfig(Section):
    loss_weight: float = Field(
        0.7, ge=0, le=1,
        description="lambda of the joint loss lambda*CE_CAT + (1-lambda)*CE_match while a task trains (DePT: 0.7).",
    )
    fusion_weight: float = Field(
        0.7, ge=0, le=1,
        description="lambda at test: a trained class's logit is lambda*CAT + (1-lambda)*match (DePT: 0.7, the "
        "loss's lambda); 0: the matching (prototype) head alone, 1: the CAT head alone.",
    )
    logit_scale: float = Field(
        100.0, gt=0, description="Temperature of the matching head's cosine logits (CLIP's exp(logit_scale) = 100)."
    )
    lr_scale: float = Field(
        6.5, gt=0, description="The CAT head's learning rate as a multiple of train.lr (DePT: 6.5)."
    )


class AlignConfig(Section):
    """Classifier alignment (Slow Learner with Classifier Alignment, Zhang et al., ICCV 2023): after every
    task the trained head is retrained on features sampled from a Gaussian per class seen, so new classes
    stop winning over old ones by recency alone. Only the statistics are kept, never an image."""

    enabled: bool = Field(True, description="Align trained heads (linear, cat) after every task.")
    rank: int = Field(
        8, ge=0,
        description="Covariance per class: the top `rank` principal directions plus an isotropic residual "
        "(probabilistic PCA); (rank + 1) x D + 1 numbers per class (28 KiB at D = 768, rank 8; a full "
        "covariance is 2.3 MiB). 0: isotropic.",
    )
    samples_per_class: int = Field(256, gt=0, description="Features drawn per class seen, per alignment epoch.")
    epochs: int = Field(5, gt=0, description="Alignment epochs after every task.")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the alignment.")
    batch_size: int = Field(64, gt=0, description="Sampled features per alignment step.")


class HeadConfig(Section):
    name: Literal["linear", "prototype", "ridge", "cat"] = Field(
        "linear",
        description="linear: grows per task, L2-normalised rows, old logits masked while a task trains; "
        "prototype: cosine to class means (nothing trained); ridge: RanPAC random projection + ridge regression "
        "from running sums (exact, order-invariant). With a prompt method, prototype and ridge heads get "
        "first-session adaptation: the prompt trains on task 0 through a temporary linear head, then stays fixed. "
        "cat: DePT's decoupled head, a prototype (matching) head plus a channel-adjusted linear (CAT) head, "
        "trained jointly with the prompt on every task (head.cat). Trained heads (linear, cat) are aligned "
        "after every task (head.align).",
    )
    ridge: RidgeConfig = RidgeConfig()
    cat: CatConfig = CatConfig()
    align: AlignConfig = AlignConfig()


class TrainConfig(Section):
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-2, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / Adam beta1.")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N.")
    compile: bool = Field(
        False,
        description="torch.compile the prompted forward (method.compile()). Measured on an H100 (ViT-B/16, bf16): "
        "APT's training step 1.30x, inference 1.16x eager, after 16-30 s of compilation per process; off by "
        "default because each task's switch between training and eval recompiles and short runs do not win "
        "that back (docs/performance.md).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"'{v}' is not one of auto, cpu, cuda, cuda:N")
        return v


class SptConfig(Section):
    mode: Literal["kmeans", "mean_pooling", "sample"] = Field(
        "kmeans",
        description="How the prompt slots of block i are drawn from the tokens entering block i: kmeans: "
        "k-means centres (SPT's token prototypes; scikit-learn); mean_pooling: means of windows of "
        "`window` consecutive tokens of one image, then a sample of those (the cheap variant); sample: "
        "a sample of the tokens themselves.",
    )
    window: int = Field(4, gt=0, description="mean_pooling: tokens averaged per window.")


class InitConfig(Section):
    name: Literal["random", "sampled_tokens", "class_prototype", "spt"] = Field(
        "random",
        description="random: the method's seeded random init (Lester's random baseline, VPT's usual init); "
        "sampled_tokens: real patch embeddings of task 0's images (Lester's sampled vocabulary); "
        "class_prototype: task 0's class means of the tokens entering each block (Lester's class-label "
        "init); spt: SPT's token prototypes of the tokens entering each block (init.spt.mode). "
        "README says what each means per method.",
    )
    distribution: Literal["trunc_normal", "uniform"] = Field(
        "trunc_normal",
        description="random only: trunc_normal (timm/VPT) or uniform with the same std (Lester's uniform).",
    )
    scale: float | None = Field(
        None, gt=0,
        description="RMS of the initial prompt. null: random inits use method.<name>.init_std; token inits "
        "keep the tokens' own scale (APT: rescaled to its init_std, see README).",
    )
    sample_images: int = Field(
        128, gt=0,
        description="Task-0 training images whose tokens (entering every block, and leaving the last) the "
        "features stage keeps for sampled_tokens, spt and SHIP; stored as (depth + 1) x images x patches x "
        "width float32.",
    )
    sample_seed: int = Field(
        0, description="Seed of the image sample (features stage); token draws and k-means use train.seed."
    )
    spt: SptConfig = SptConfig()


class EvalConfig(Section):
    batch_size: int = Field(256, gt=0)


class GateConfig(Section):
    """What a registered version must reach to be approvable; each bound null = not checked. A version that
    fails is tagged gate=failed with the reasons, and `promptcil review approve` refuses it."""

    min_A_last: float | None = Field(0.5, ge=0, le=1, description="Least accuracy on all classes seen, after the last task.")
    max_forgetting: float | None = Field(0.3, ge=0, le=1, description="Most average forgetting of the earlier tasks.")
    min_newest_task_accuracy: float | None = Field(
        0.5, ge=0, le=1,
        description="Least accuracy on the newest task's classes after training it (a retrain: the incoming "
        "classes' held-out images). Fails a version that never predicts what it just learned.",
    )
    min_base_accuracy: float | None = Field(
        0.5, ge=0, le=1, description="Least accuracy on task 0's classes after the last task."
    )


class RegistryConfig(Section):
    model_name: str = Field("promptcil", min_length=1, description="MLflow registered model name.")
    experiment: str = Field("promptcil", min_length=1, description="MLflow experiment name.")
    gate: GateConfig = GateConfig()


class RetrainConfig(Section):
    incoming: Path = Field(Path("incoming"), description="Folder of new classes: incoming/<class name>/<images>.")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Per new class, images held out for evaluation.")
    work_dir: Path = Field(Path("outputs/retrain"), description="Where retrain runs keep checkpoints (resumable).")
    cron: str = Field("0 3 * * *", description="Schedule of `promptcil serve` / `flows/retrain.py --serve`.")


class Params(Section):
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()
    head: HeadConfig = HeadConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    retrain: RetrainConfig = RetrainConfig()


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see README's params reference)"
    where = f"{source}: {loc}: " if loc else f"{source}: "
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}{msg}{more}"


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError with a one-line message."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw or {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A params mapping with dotted keys and string values (MLflow's params, the keys an override sets)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay`'s values put in, section by section (an overlay names only what it changes)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merged_params(path: str | Path = "params.yaml", *overlays: str | Path) -> dict[str, Any]:
    """The raw mapping of params.yaml with each overlay (a preset from configs/: only the keys it
    changes) merged on top, in order; validated."""
    raw = _read_mapping(Path(path))
    for overlay in overlays:
        raw = deep_merge(raw, _read_mapping(Path(overlay)))
    parse_params(raw, " + ".join(str(p) for p in (path, *overlays)))
    return raw


def load_params(path: str | Path = "params.yaml", *overlays: str | Path) -> Params:
    """params.yaml (plus overlays, see `merged_params`) as typed, validated parameters."""
    return parse_params(merged_params(path, *overlays), " + ".join(str(p) for p in (path, *overlays)))


class StudySpec(BaseModel):
    """A study (flows/study.py): a grid of pipeline runs, variants x protocols x seeds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="names the MLflow experiment study-<name>")
    description: str = ""
    protocols: dict[str, list[str]] = Field(min_length=1, description="name -> params file + presets laid over it")
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> params overrides")
    columns: dict[str, str] = Field(default_factory=dict, description="extra table columns: header -> result key")
    probe_first_epoch: bool = False  # also task 0's test accuracy after its first epoch (trained heads)

    @field_validator("protocols")
    @classmethod
    def _protocol_has_files(cls, protocols: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, files in protocols.items():
            if not files:
                raise ValueError(f"protocol '{name}' names no params file")
        return protocols


def load_study(path: str | Path) -> StudySpec:
    """A study file, validated: one line naming the key on a problem."""
    try:
        return StudySpec.model_validate(_read_mapping(Path(path)))
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path))) from None


def write_resolved_params(out: Path, path: str | Path = "params.yaml", *overlays: str | Path) -> Path:
    """Write params.yaml + overlays as one complete params file (what the stages of a preset run read)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(merged_params(path, *overlays), sort_keys=False))
    return out
