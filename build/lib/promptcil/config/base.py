"""What every part of params.yaml shares: strict sections, one-line errors, reading and merging files.

Every section forbids unknown keys, so a typo fails loudly instead of being ignored; pydantic's report
becomes one line naming the key path, e.g. ``params.yaml: train.lr: Input should be greater than 0``.
Nothing here imports torch: the CLI's review commands validate their section with it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from promptcil.errors import ConfigError


class Section(BaseModel):
    """A part of params.yaml: unknown keys are errors, values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SectionT = TypeVar("SectionT", bound=BaseModel)


def format_error(err: ValidationError, source: str, prefix: str = "") -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/params.md)"
    where = f"{source}: {loc}: " if loc else f"{source}: "
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}{msg}{more}"


def validate(model: type[SectionT], raw: Any, source: str, prefix: str = "") -> SectionT:
    """`raw` as `model`, or a ConfigError naming the key path (under `prefix`) in one line."""
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise ConfigError(format_error(err, source, prefix)) from None


def read_mapping(path: Path) -> dict[str, Any]:
    path = Path(path)
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


def merged_raw(path: str | Path, *overlays: str | Path) -> dict[str, Any]:
    """params.yaml's mapping with each overlay (a preset: only the keys it changes) merged on top, in
    order; not validated (see `promptcil.config.merged_params`)."""
    raw = read_mapping(Path(path))
    for overlay in overlays:
        raw = deep_merge(raw, read_mapping(Path(overlay)))
    return raw


def describe_sources(path: str | Path, *overlays: str | Path) -> str:
    return " + ".join(str(p) for p in (path, *overlays))


def load_section(model: type[SectionT], name: str, path: str | Path = "params.yaml") -> SectionT:
    """One section of a params file, validated alone (for commands that read nothing else)."""
    raw = read_mapping(Path(path)).get(name)
    return validate(model, raw, str(path), prefix=name)
