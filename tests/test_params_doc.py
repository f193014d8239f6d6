"""docs/params.md is generated from the schema, current, and documents every key of params.yaml."""

from __future__ import annotations

import yaml

from promptcil.config import flatten
from promptcil.config.docs import DOC, PARAMS, leaf_fields, params_markdown


def test_doc_is_current() -> None:
    assert DOC.read_text() == params_markdown(), "docs/params.md is stale: run `python -m promptcil.config.docs`"


def test_every_params_yaml_key_is_documented() -> None:
    doc = DOC.read_text()
    missing = [key for key in flatten(yaml.safe_load(PARAMS.read_text())) if f"| `{key}` |" not in doc]
    assert not missing, f"params.yaml keys without a row in docs/params.md: {missing}"


def test_every_field_has_a_description() -> None:
    undescribed = sorted(key for key, field in leaf_fields().items() if not (field.description or "").strip())
    assert not undescribed, f"fields without a description (pydantic Field(description=...)): {undescribed}"
