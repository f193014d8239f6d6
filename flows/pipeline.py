"""The full pipeline as one Prefect flow: the SAME stage functions `dvc repro` runs.

    python flows/pipeline.py                                            # what `make demo` runs
    python flows/pipeline.py --preset configs/fashion-mnist-b4inc2.yaml  # params.yaml + a preset overlay
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
from prefect import flow, get_run_logger, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: stages/ is a sibling

from promptcil.config import ConfigError, load_params, write_resolved_params  # noqa: E402
from stages.evaluate import evaluate  # noqa: E402
from stages.features import features  # noqa: E402
from stages.prepare import prepare  # noqa: E402
from stages.pretrain import pretrain  # noqa: E402
from stages.prompt_init import prompt_init  # noqa: E402
from stages.prototypes import prototypes  # noqa: E402
from stages.register import register  # noqa: E402
from stages.train import train  # noqa: E402

# I/O-bound steps retry (a busy disk, a locked sqlite store); compute steps do not, they resume instead.
prepare_task = task(prepare, name="prepare", retries=2, retry_delay_seconds=2)
pretrain_task = task(pretrain, name="pretrain")
features_task = task(features, name="features")
prototypes_task = task(prototypes, name="prototypes")
prompt_init_task = task(prompt_init, name="prompt_init")
train_task = task(train, name="train")
evaluate_task = task(evaluate, name="evaluate")
register_task = task(register, name="register", retries=2, retry_delay_seconds=2)


RESOLVED_PARAMS = Path("outputs/params.resolved.yaml")


@flow(name="promptcil-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", presets: list[str] | None = None, progress: bool = True) -> dict:
    """Every stage in order. With presets, params.yaml + the overlays are written to
    outputs/params.resolved.yaml and every stage (and the registered run) reads that file."""
    logger = get_run_logger()
    if presets:
        params_path = str(write_resolved_params(RESOLVED_PARAMS, params_path, *presets))
        logger.info("params: %s", " + ".join(["params.yaml", *presets]))
    split = prepare_task(params_path)
    logger.info("prepared %d tasks", split["num_tasks"])
    backbone = pretrain_task(params_path, progress=progress)
    logger.info("backbone %s (%s), weights sha256 %s", backbone["name"], backbone["source"], backbone["weights_sha256"][:12])
    features_task(params_path)
    prototypes_task()
    prompt_init_task(params_path)
    train_task(params_path, progress=progress)
    metrics = evaluate_task(params_path)
    forgetting = "–" if metrics["forgetting"] is None else f"{metrics['forgetting']:.3f}"
    logger.info("A_last %.3f  A_avg %.3f  forgetting %s", metrics["A_last"], metrics["A_avg"], forgetting)
    registered = register_task(params_path)
    logger.info("registered %s version %s: gate=%s", registered["model_name"], registered["version"], registered["gate"])
    return {"metrics": metrics, "registration": registered}


if __name__ == "__main__":
    from promptcil.report import print_summary

    parser = argparse.ArgumentParser(description="Run the whole promptcil pipeline as one Prefect flow.")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--preset", action="append", default=[], metavar="YAML",
                        help="overlay from configs/ merged on top of --params (repeatable, in order)")
    args = parser.parse_args()
    try:
        load_params(args.params, *args.preset)  # a bad params file or preset: one line, before any stage runs
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result = pipeline(args.params, args.preset)
    print_summary(result["metrics"], result["registration"])
