"""The errors a user can fix, and the one exit-code table for every entry point (stages, flows, CLI).

Each ends a command with one line on stderr, `error: <what and what to change>`, never a traceback:

| exit | error | meaning |
|---:|---|---|
| 1 | ReviewError | a registry action refused (approve a failed version, reject the champion, ...) |
| 2 | ConfigError, BackboneError | params, a preset, a study file or the command line asks for something invalid |
| 3 | DataError | the data: a missing folder, an empty class, a corrupt image |
| 4 | ArtifactError | an artifact missing, half-written, tampered with or refused (pickle) |

Anything else is a bug and keeps its traceback (exit 1). Nothing here imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar


class PromptcilError(Exception):
    """An error the user can fix; its message is one line naming the key, file or action."""

    exit_code = 1


class ReviewError(PromptcilError, ValueError):
    """A review action the registry refuses; the message says why and what to do instead."""

    exit_code = 1


class ConfigError(PromptcilError, ValueError):
    """A params.yaml (or preset, study file, argument) problem, naming the key path."""

    exit_code = 2


class BackboneError(ConfigError):
    """A backbone that promptcil cannot prompt or load (a config problem: backbone.*)."""


class DataError(PromptcilError, ValueError):
    """A data problem, naming the file or the params key to change."""

    exit_code = 3


class ArtifactError(PromptcilError, RuntimeError):
    """A file promptcil cannot write or will not trust; the message names the file and the fix."""

    exit_code = 4


def fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a PromptcilError into its one line and exit code (the table above)."""
    try:
        yield
    except PromptcilError as err:
        fail(str(err), err.exit_code)


T = TypeVar("T")


def guarded(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    with one_line_errors():
        return fn(*args, **kwargs)
