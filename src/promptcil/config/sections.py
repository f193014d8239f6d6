"""The sections of params.yaml that no registry extends: backbone, train, eval, registry, retrain.

The sections that registries extend (data sources, prompt methods, heads, initialisers) are assembled
in `promptcil.config.schema`; their shared fields are the `*Base` models here. Nothing here imports
torch, so commands that read one of these sections stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from promptcil.config.base import Section


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
    data: str = Field(
        "base_classes",
        description="What the backbone is pretrained on (backbone.source: pretrain). base_classes: task 0 of the "
        "downstream data (the B-N protocol); a source name: ALL classes of that data set's train split, an "
        "'upstream' data set standing in for ImageNet (e.g. fashion_mnist before digits tasks); fractal: images "
        "rendered from random iterated function systems (backbone.pretrain.fractal), no natural image at all. "
        "Checked against the registered data sources when the whole params file is validated.",
    )
    root: Path | None = Field(None, description="Data folder of the upstream source (as data.root; null: data/raw "
                              "or Debian's Fashion-MNIST package).")
    epochs: int = Field(30, gt=0, description="Supervised epochs on the pretraining data.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(64, gt=0, description="Images per pretraining step.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the pretraining cross-entropy.")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the pretraining forward (under torchrun: the ViT as one graph inside DDP, which "
        "the compile cache keeps for the next run): true, false, or auto (on CUDA when pretraining takes at least "
        "3000 steps, as train.compile). Measured on an H200 (ViT-B/16, bf16, batch 256): the step 1.27x eager on "
        "one GPU, ~18 s to compile with an empty cache (docs/scaling.md).",
    )
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


class AugmentConfig(Section):
    """train.augment: applied to the training steps' images only (never to the heads' passes or evaluation)."""

    crop_scale: tuple[float, float] | None = Field(
        None, description="Random resized crop: the crop's area as a fraction of the image, drawn uniformly "
        "from [low, high] (e.g. [0.5, 1.0]), resampled to the model's input size. null: no crop.")
    crop_ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="The crop's aspect ratio (width / height), drawn log-uniformly from [low, high].")
    flip: bool = Field(False, description="Flip half the images left-right (not for digits or text).")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"{list(v)}: needs 0 < low <= high <= 1")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"{list(v)}: needs 0 < low <= high")
        return v

    @property
    def enabled(self) -> bool:
        return self.crop_scale is not None or self.flip


class TrainConfig(Section):
    epochs: int = Field(5, gt=0, description="Epochs per task (the first task only, for analytic heads' adaptation).")
    batch_size: int = Field(32, gt=0, description="Images per training step.")
    lr: float = Field(1e-2, gt=0, description="Learning rate of the prompt and the head (a head may scale its own).")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="A fresh optimizer per task.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / Adam beta1.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the prompt and head.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="Learning rate over a task's epochs: cosine to 0, or constant.")
    seed: int = Field(0, description="Seeds the prompt's init, the shuffles and the head's draws (per task and epoch).")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N.")
    nproc: int = Field(
        1, ge=1,
        description="Processes the pretrain, features, train and evaluate stages run on (torchrun: one per GPU, "
        "gloo on a CPU; rank 0 writes). 1: one process, no torch.distributed.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="Augmentation on the device (off: no augmentation).")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the prompted forward (method.compile()): true, false, or auto (on CUDA when "
        "the run trains for at least 3000 steps, enough to repay a first compilation). Compiled artifacts are "
        "cached in $TORCHINDUCTOR_CACHE_DIR (default ~/.cache/promptcil/torch-compile) for the next run. "
        "Measured on an H100 (ViT-B/16, bf16): APT's training step 1.30x, inference 1.16x eager "
        "(docs/performance.md).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"'{v}' is not one of auto, cpu, cuda, cuda:N")
        return v


class EvalConfig(Section):
    batch_size: int = Field(
        256, gt=0, description="Images per batch when features, accuracy and the joint bound are computed.")


class GateConfig(Section):
    """What a registered version must reach to be approvable; each bound null = not checked. A version that
    fails is tagged gate=failed with the reasons, and `promptcil review approve` refuses it."""

    min_A_last: float | None = Field(
        0.5, ge=0, le=1, description="Least accuracy on all classes seen, after the last task.")
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


# ---------------------------------------------------------------- bases of the registry-assembled sections


class DataBase(Section):
    """`data`'s fields every source shares; each registered source adds its own (promptcil.data.sources)."""

    source: str = Field(
        "digits", description="Where images come from: a registered data source (docs/params.md lists them); "
        "`digits` is bundled with scikit-learn (the offline default).")
    root: Path | None = Field(
        None,
        description="Data folder: torchvision root for fashion_mnist/cifar100, or an ImageFolder tree "
        "with train/ and test/ subfolders (one folder per class) for imagefolder. Relative paths are "
        "relative to the workspace.",
    )
    download: bool = Field(False, description="Let torchvision download fashion_mnist/cifar100 when online.")
    base_classes: int = Field(4, gt=0, description="Classes in task 0 (the 'B' of B-N protocols).")
    classes_per_task: int = Field(2, gt=0, description="Classes in each incremental task after task 0.")
    class_order_seed: int = Field(1993, description="Seed of the class-order permutation.")
    class_order: list[int] | None = Field(
        None, description="Explicit class order (original class ids); overrides class_order_seed."
    )
    shards: bool = Field(
        False, description="Prepare the images as WebDataset tar shards of the encoded files (one class per shard) "
        "and stream them, instead of decoding every image into memory: for sources larger than memory "
        "(imagefolder; docs/operations.md, 'Data larger than memory').")
    shard_images: int = Field(2048, gt=0, description="Images per shard at most (data.shards).")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where sharded images are decoded: gpu (nvjpeg, JPEGs; other formats in the loader's "
        "threads), cpu (the loader's threads, libjpeg-turbo), auto (cpu, or gpu when the model runs on CUDA with fewer "
        "than 8 loader threads: measured, threads on free cores overlap the model's work better than nvjpeg).")
    decode_cpu_share: float = Field(
        0.0, ge=0, lt=1, description="With decode on the GPU: this share of the JPEGs decoded by the loader's threads "
        "beside nvjpeg (torchvision runs one GPU decode at a time per process; the CPU adds decoders outside that "
        "lock). Each image always the same way, picked by its place in its shard. 0: every JPEG by nvjpeg.")
    loader_workers: int | None = Field(
        None, ge=0, description="Loader threads that read (and with decode cpu decode) sharded images "
        "(default: min(8, CPUs), the CPUs shared among a machine's torchrun processes); 0 reads in the calling thread.")

    @field_validator("class_order")
    @classmethod
    def _order_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("class ids must be unique (a class cannot appear in two tasks)")
        return v


class MethodBase(Section):
    """`method`'s shared fields; each registered prompt method adds `method.<name>` (promptcil.prompts)."""

    name: str = Field("apt", description="Prompt method: a registered one; `none` is SimpleCIL (frozen features).")
    ensemble: int = Field(
        1, gt=0,
        description="Lester's prompt ensembling: K prompts (each with its own head, initialised from a different "
        "seed) trained side by side in one batched forward; predictions = mean of their logits. Methods that "
        "support it: apt, vpt.",
    )


class HeadBase(Section):
    """`head`'s shared fields; each registered head adds `head.<name>` when it has settings (promptcil.heads)."""

    name: str = Field(
        "linear",
        description="linear: grows per task, L2-normalised rows, old logits masked while a task trains; "
        "prototype: cosine to class means (nothing trained); ridge: RanPAC random projection + ridge regression "
        "from running sums (exact, order-invariant). With a prompt method, prototype and ridge heads get "
        "first-session adaptation: the prompt trains on task 0 through a temporary linear head, then stays fixed. "
        "cat: DePT's decoupled head, a prototype (matching) head plus a channel-adjusted linear (CAT) head, "
        "trained jointly with the prompt on every task (head.cat). Trained heads (linear, cat) are aligned "
        "after every task (head.align).",
    )


class InitBase(Section):
    """`init`'s shared fields; each registered initialiser may add `init.<name>` (promptcil.init)."""

    name: str = Field(
        "random",
        description="random: the method's seeded random init (Lester's random baseline, VPT's usual init); "
        "sampled_tokens: real patch embeddings of task 0's images (Lester's sampled vocabulary); "
        "class_prototype: task 0's class means of the tokens entering each block (Lester's class-label "
        "init); spt: SPT's token prototypes of the tokens entering each block (init.spt.mode). "
        "docs/methods.md says what each means per method.",
    )
    distribution: Literal["trunc_normal", "uniform"] = Field(
        "trunc_normal",
        description="random only: trunc_normal (timm/VPT) or uniform with the same std (Lester's uniform).",
    )
    scale: float | None = Field(
        None, gt=0,
        description="RMS of the initial prompt. null: random inits use method.<name>.init_std; token inits "
        "keep the tokens' own scale (APT: rescaled to its init_std, see docs/methods.md).",
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
