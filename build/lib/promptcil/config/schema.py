"""The whole params.yaml schema, assembled from the registries.

`data`, `method`, `head` and `init` are each a base section (promptcil.config.sections) plus what the
registered data sources, prompt methods, heads and initialisers add: the valid names come from the
registries, and each registered thing's settings live in its own file beside it. Importing this
module imports every registered module (and so torch); commands that read one plain section use
`promptcil.config.base.load_section` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from promptcil.config.base import (
    ConfigError,
    Section,
    describe_sources,
    merged_raw,
    validate,
)
from promptcil.config.sections import (
    BackboneConfig,
    DataBase,
    EvalConfig,
    HeadBase,
    InitBase,
    MethodBase,
    RegistryConfig,
    RetrainConfig,
    TrainConfig,
)
from promptcil.data.sources import SOURCES
from promptcil.heads import HEADS
from promptcil.heads.alignment import AlignConfig
from promptcil.init import INITIALISERS
from promptcil.prompts import METHODS
from promptcil.registry import Registry

PRETRAIN_DATA_EXTRA = ("base_classes", "fractal")  # besides the data sources: task 0, rendered fractals


def _name_field(base: type[Section], registry: Registry[Any]) -> tuple[Any, Any]:
    """`name` as a Literal of the registered names (pydantic then lists them in its error), keeping the
    base's default and description."""
    field = base.model_fields["name" if "name" in base.model_fields else "source"]
    names = tuple(registry.names())
    return Literal[names], Field(field.default, description=field.description)  # type: ignore[valid-type]


def _settings_fields(registry: Registry[Any]) -> dict[str, Any]:
    """One sub-section per registered thing that has settings: `<section>.<name>`."""
    return {entry.name: (entry.config, entry.config()) for entry in registry.entries() if entry.config is not None}


def _check_method(self: Any) -> Any:
    if self.ensemble > 1 and not METHODS[self.name].obj.supports_ensemble:
        able = [e.name for e in METHODS.entries() if e.obj.supports_ensemble]
        raise ValueError(f"ensemble {self.ensemble} needs method {' or '.join(able)}, not {self.name}")
    return self


MethodConfig = create_model(
    "MethodConfig", __base__=MethodBase, __doc__=MethodBase.__doc__,
    __validators__={"_check": model_validator(mode="after")(_check_method)},
    name=_name_field(MethodBase, METHODS), **_settings_fields(METHODS),
)
HeadConfig = create_model(
    "HeadConfig", __base__=HeadBase, __doc__=HeadBase.__doc__,
    name=_name_field(HeadBase, HEADS), align=(AlignConfig, AlignConfig()), **_settings_fields(HEADS),
)
InitConfig = create_model(
    "InitConfig", __base__=InitBase, __doc__=InitBase.__doc__,
    name=_name_field(InitBase, INITIALISERS), **_settings_fields(INITIALISERS),
)
# a data source's settings are flat fields of `data` itself (data.test_fraction, data.image_size)
DataConfig = create_model(
    "DataConfig", __base__=(*(e.config for e in SOURCES.entries() if e.config is not None), DataBase),
    __doc__=DataBase.__doc__, source=_name_field(DataBase, SOURCES),
)


class Params(Section):
    data: DataConfig = DataConfig()  # type: ignore[valid-type]
    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()  # type: ignore[valid-type]
    head: HeadConfig = HeadConfig()  # type: ignore[valid-type]
    init: InitConfig = InitConfig()  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _pretraining_data(self) -> "Params":
        known = (*PRETRAIN_DATA_EXTRA, *SOURCES.names())
        if self.backbone.pretrain.data not in known:
            raise ValueError(
                f"backbone.pretrain.data: '{self.backbone.pretrain.data}' is not one of {', '.join(known)}")
        return self


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ConfigError with a one-line message."""
    return validate(Params, raw, source)


def merged_params(path: str | Path = "params.yaml", *overlays: str | Path) -> dict[str, Any]:
    """The raw mapping of params.yaml with each overlay (a preset from configs/: only the keys it
    changes) merged on top, in order; validated."""
    raw = merged_raw(path, *overlays)
    parse_params(raw, describe_sources(path, *overlays))
    return raw


def load_params(path: str | Path = "params.yaml", *overlays: str | Path) -> Params:
    """params.yaml (plus overlays, see `merged_params`) as typed, validated parameters."""
    return parse_params(merged_raw(path, *overlays), describe_sources(path, *overlays))


def write_resolved_params(out: Path, path: str | Path = "params.yaml", *overlays: str | Path) -> Path:
    """Write params.yaml + overlays as one complete params file (what the stages of a preset run read)."""
    import yaml

    from promptcil.artifacts import atomic_write_bytes

    atomic_write_bytes(Path(out), yaml.safe_dump(merged_params(path, *overlays), sort_keys=False).encode())
    return Path(out)


__all__ = ["ConfigError", "DataConfig", "HeadConfig", "InitConfig", "MethodConfig", "Params", "load_params",
           "merged_params", "parse_params", "write_resolved_params"]
