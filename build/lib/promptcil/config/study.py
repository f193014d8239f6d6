"""A study file (flows/study.py): a grid of pipeline runs, variants x protocols x seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from promptcil.config.base import read_mapping, validate


class Protocol(BaseModel):
    """A protocol: a params file, the presets laid over it, and overrides laid over those (what its
    shared stages read: a variant may not change it)."""

    model_config = ConfigDict(extra="forbid")

    files: list[str] = Field(min_length=1, description="params file, then presets (paths from the repository)")
    set: dict[str, Any] = Field(default_factory=dict, description="params overrides after the files")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="names the MLflow experiment study-<name>")
    description: str = ""
    protocols: dict[str, Protocol] = Field(
        min_length=1, description="name -> [params file, presets...] or {files: [...], set: {overrides}}")
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> params overrides")
    columns: dict[str, str] = Field(default_factory=dict, description="extra table columns: header -> result key")
    probe_first_epoch: bool = False  # also task 0's test accuracy after its first epoch (trained heads)

    @field_validator("protocols", mode="before")
    @classmethod
    def _files_alone(cls, protocols: Any) -> Any:
        """A protocol given as a plain list is its files."""
        if isinstance(protocols, dict):
            return {name: {"files": value} if isinstance(value, list) else value for name, value in protocols.items()}
        return protocols


def load_study(path: str | Path) -> StudySpec:
    """A study file, validated: one line naming the key on a problem."""
    return validate(StudySpec, read_mapping(Path(path)), str(path))
