"""Where a pipeline run reads and writes: a folder, never the current directory.

A stage is a function of (params, workspace), so any number of runs can share a process, a thread pool,
a Dask worker or a torchrun job: each names its own workspace. A workspace's outputs live in
`<root>/outputs/<stage folder>`; a workspace made `on_top_of` another (a study run over its protocol's
shared stages) reads the shared stages' outputs from there and writes only its own. Relative paths in
params (data.root, backbone.file, backbone.pretrain.root, retrain.incoming, retrain.work_dir) are
relative to the workspace root: `localise` makes them absolute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# stage -> the folder under outputs/ it writes (the pretrain stage writes the backbone)
STAGE_FOLDERS = {"prepare": "prepare", "pretrain": "backbone", "features": "features", "prototypes": "prototypes",
                 "prompt_init": "prompt_init", "train": "train", "evaluate": "evaluate", "register": "register"}
SHARED_STAGES = ("prepare", "pretrain", "features", "prototypes")
"""What every variant of a protocol shares in a study: they read only data, backbone and eval params."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    shared: Workspace | None = field(default=None, compare=False)
    """Where the shared stages' outputs are read from (None: this workspace's own)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def on_top_of(self, shared: Workspace) -> Workspace:
        """This workspace, reading the shared stages' outputs from `shared`."""
        return Workspace(self.root, shared)

    def out(self, stage: str) -> Path:
        """The folder `stage` writes in this workspace."""
        return self.root / "outputs" / STAGE_FOLDERS[stage]

    def of(self, stage: str) -> Path:
        """The folder `stage`'s outputs are read from (the shared workspace's for a shared stage)."""
        if self.shared is not None and stage in SHARED_STAGES:
            return self.shared.out(stage)
        return self.out(stage)

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def resolved_params_file(self) -> Path:
        """params.yaml + presets written as one file (the flow's --preset), which every stage then reads."""
        return self.root / "outputs" / "params.resolved.yaml"

    @property
    def tracking_uri(self) -> str:
        """The embedded MLflow store of this workspace (MLFLOW_TRACKING_URI overrides it)."""
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def path(self, value: str | Path) -> Path:
        value = Path(value)
        return value if value.is_absolute() else self.root / value

    def localise(self, params: Any) -> Any:
        """`params` with every relative path made absolute under the root (a null data root: <root>/data/raw).
        For reading and writing only: records (MLflow params, producer records) keep params as written."""
        from promptcil.data.sources import DEFAULT_ROOT

        backbone = params.backbone
        pretrain_root = backbone.pretrain.root
        return params.model_copy(update={
            "data": params.data.model_copy(update={"root": self.path(params.data.root or DEFAULT_ROOT)}),
            "backbone": backbone.model_copy(update={
                "file": None if backbone.file is None else self.path(backbone.file),
                "pretrain": backbone.pretrain.model_copy(update={"root": self.path(pretrain_root or DEFAULT_ROOT)}),
            }),
            "retrain": params.retrain.model_copy(update={
                "incoming": self.path(params.retrain.incoming), "work_dir": self.path(params.retrain.work_dir)}),
        })
