"""The command line of a stage: `python -m stages.<name> [--root DIR] [--params FILE]`, as dvc.yaml runs it.

A stage module defines `run(params, workspace, *, progress)` and ends with `stage_main(run, __doc__)`.
Known problems end in one line and the exit code of `promptcil.errors`' table, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptcil.errors import one_line_errors
from promptcil.workspace import Workspace


def stage_main(run: Callable[..., Any], doc: str | None, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0])
    parser.add_argument("--root", default=".", help="the workspace: params.yaml and outputs/ (default: here)")
    parser.add_argument("--params", help="the params file (default: ROOT/params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the one-line notes (starting clean, ...)
    with one_line_errors():
        from promptcil.config import load_params

        workspace = Workspace(Path(args.root))
        params = load_params(args.params or workspace.params_file)
        progress = not args.no_progress and os.environ.get("PROMPTCIL_PROGRESS", "1") != "0"
        stage = sys.modules[run.__module__].__spec__.name.rsplit(".", 1)[-1]
        if needs_launch(stage, params.train.nproc):  # train.nproc > 1: this command starts torchrun itself
            from promptcil.distributed import launch

            launch(stage, workspace.root, Path(args.params).resolve() if args.params else None, params.train.nproc)
            return
        run(params, workspace, progress=progress)


def needs_launch(stage: str, nproc: int) -> bool:
    """Whether a stage must start its processes itself: several asked for, and not already under torchrun."""
    from promptcil.distributed import DISTRIBUTED_STAGES, LAUNCHED

    return stage in DISTRIBUTED_STAGES and nproc > 1 and LAUNCHED not in os.environ \
        and "TORCHELASTIC_RUN_ID" not in os.environ
