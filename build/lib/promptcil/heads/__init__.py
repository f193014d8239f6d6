"""Classifier heads behind `Head` (see base.py); every module of this package registers its head (and its
settings, `head.<name>`) with `HEADS` when the registry is first asked."""

from promptcil.heads.base import HEADS, Head, create_head, register_head

__all__ = ["HEADS", "Head", "create_head", "register_head"]
