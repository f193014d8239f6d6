"""Prompt methods, one module each, behind `PromptMethod` (see base.py); every module of this package
registers its method (and its settings, `method.<name>`) with `METHODS` when the registry is first asked."""

from promptcil.prompts.base import METHODS, PromptMethod, create_method, register_method

__all__ = ["METHODS", "PromptMethod", "create_method", "register_method"]
