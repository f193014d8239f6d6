"""The full pipeline as one Prefect flow: the SAME stage functions `dvc repro` runs.

    python -m flows.pipeline                                            # what `make demo` runs
    python -m flows.pipeline --preset configs/fashion-mnist-b4inc2.yaml  # params.yaml + a preset overlay
    python -m flows.pipeline --root DIR                                  # another workspace
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from promptcil.config import Params, load_params, write_resolved_params
from promptcil.distributed import launch
from promptcil.entry import needs_launch
from promptcil.errors import one_line_errors
from promptcil.workspace import Workspace
from stages import evaluate, features, prepare, pretrain, prompt_init, prototypes, register, train


def stage_task(module: Any, *, retries: int = 0):
    """A stage as a Prefect task (never cached: DVC and the producer records decide what reruns); with
    train.nproc > 1 the distributed stages run on that many processes under torchrun."""
    name = module.__name__.rsplit(".", 1)[-1]

    def run(params: Params, workspace: Workspace, *, progress: bool, params_file: Path) -> dict[str, Any]:
        if needs_launch(name, params.train.nproc):
            launch(name, workspace.root, params_file, params.train.nproc)
            return module.result(workspace)
        return module.run(params, workspace, progress=progress)

    return task(run, name=name, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=2)


# I/O-bound steps retry (a busy disk, a locked sqlite store); compute steps do not, they resume instead.
STAGES = {module.__name__.rsplit(".", 1)[-1]: stage_task(module, retries=2 if module in (prepare, register) else 0)
          for module in (prepare, pretrain, features, prototypes, prompt_init, train, evaluate, register)}


def resolve_params(workspace: Workspace, params_file: str | None, presets: list[str]) -> tuple[Params, Path]:
    """params.yaml (or `params_file`) with the presets merged on top, and the file that holds them: with
    presets the merged file is written to outputs/params.resolved.yaml, the params this run used."""
    source = Path(params_file).resolve() if params_file else workspace.params_file
    if presets:
        source = write_resolved_params(workspace.resolved_params_file, source, *presets)
    return load_params(source), source


@flow(name="promptcil-pipeline", log_prints=True)
def pipeline(root: str = ".", presets: list[str] | None = None, params_file: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Every stage in order in the workspace `root`; returns {"metrics", "registration"}."""
    logger = get_run_logger()
    workspace = Workspace(Path(root))
    params, source = resolve_params(workspace, params_file, presets or [])
    if presets:
        logger.info("params: %s", " + ".join([str(params_file or "params.yaml"), *presets]))
    if params.train.nproc > 1:
        logger.info("pretrain, features, train and evaluate on %d processes (torchrun)", params.train.nproc)
    split = STAGES["prepare"](params, workspace, progress=progress, params_file=source)
    logger.info("prepared %d tasks", split["num_tasks"])
    backbone = STAGES["pretrain"](params, workspace, progress=progress, params_file=source)
    logger.info("backbone %s (%s), weights sha256 %s", backbone["name"], backbone["source"],
                backbone["weights_sha256"][:12])
    for name in ("features", "prototypes", "prompt_init", "train"):
        STAGES[name](params, workspace, progress=progress, params_file=source)
    metrics = STAGES["evaluate"](params, workspace, progress=progress, params_file=source)
    forgetting = "–" if metrics["forgetting"] is None else f"{metrics['forgetting']:.3f}"
    logger.info("A_last %.3f  A_avg %.3f  forgetting %s", metrics["A_last"], metrics["A_avg"], forgetting)
    registered = STAGES["register"](params, workspace, progress=progress, params_file=source)
    logger.info("registered %s version %s: gate=%s",
                registered["model_name"], registered["version"], registered["gate"])
    return {"metrics": metrics, "registration": registered}


def main(argv: list[str] | None = None) -> None:
    from promptcil.report import print_summary

    parser = argparse.ArgumentParser(description="Run the whole promptcil pipeline as one Prefect flow.")
    parser.add_argument("--root", default=".", help="the workspace: params.yaml and outputs/ (default: here)")
    parser.add_argument("--params", help="the params file (default: ROOT/params.yaml)")
    parser.add_argument("--preset", action="append", default=[], metavar="YAML",
                        help="overlay from configs/ merged on top of the params (repeatable, in order)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with one_line_errors():
        load_params(args.params or Workspace(Path(args.root)).params_file, *args.preset)  # one line, before Prefect
        result = pipeline(args.root, args.preset, args.params)
    print_summary(result["metrics"], result["registration"])


if __name__ == "__main__":
    main()
