"""params.yaml: the single source of configuration for DVC, Prefect and the CLI.

Light names (the plain sections, errors, reading and merging) import without torch; the whole schema
(`Params`, `load_params`, ...), which the registries assemble, is imported on first use.
"""

from __future__ import annotations

from typing import Any

from promptcil.config.base import (
    ConfigError,
    Section,
    deep_merge,
    flatten,
    load_section,
    merged_raw,
    read_mapping,
)
from promptcil.config.sections import (
    AugmentConfig,
    BackboneConfig,
    EvalConfig,
    FractalConfig,
    GateConfig,
    PretrainConfig,
    RegistryConfig,
    RetrainConfig,
    TrainConfig,
)
from promptcil.config.study import StudySpec, load_study

_SCHEMA = {"Params", "DataConfig", "MethodConfig", "HeadConfig", "InitConfig", "load_params", "parse_params",
           "merged_params", "write_resolved_params"}


def __getattr__(name: str) -> Any:
    if name in _SCHEMA:
        from promptcil.config import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'promptcil.config' has no attribute '{name}'")


__all__ = [
    "AugmentConfig", "BackboneConfig", "ConfigError", "DataConfig", "EvalConfig", "FractalConfig", "GateConfig",
    "HeadConfig", "InitConfig", "MethodConfig", "Params", "PretrainConfig", "RegistryConfig", "RetrainConfig",
    "Section", "StudySpec", "TrainConfig", "deep_merge", "flatten", "load_params", "load_section", "load_study",
    "merged_params", "merged_raw", "parse_params", "read_mapping", "write_resolved_params",
]
