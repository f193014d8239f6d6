"""`promptcil …`: review registry versions, predict with a registered model, check params.yaml,
and serve the scheduled retrain.

Every error a user can fix (bad params.yaml, an unknown version, a refused review, an unreadable
image or artifact) ends the command with one line on stderr and the exit code of the one table in
`promptcil.errors` (1 refused, 2 configuration or usage, 3 data, 4 artifact), never a traceback.
Heavy libraries (torch, timm, MLflow) are imported by the commands that need them, so `--help` is
instant and the review commands pay only for MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from promptcil.config import ConfigError, RegistryConfig, load_section
from promptcil.errors import DataError, PromptcilError

PARAMS = Path("params.yaml")

app = typer.Typer(
    help="Class-incremental prompts on a frozen ViT: review, predict, check params, serve retraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
review_app = typer.Typer(
    help="Review registry versions: only an approved version that passed the quality gate becomes champion.",
    no_args_is_help=True,
)
params_app = typer.Typer(help="Check params.yaml, the single source of configuration.", no_args_is_help=True)
services_app = typer.Typer(
    help="A local team stack: PostgreSQL, MLflow and Prefect servers, a worker (docs/operations.md).",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")
app.add_typer(params_app, name="params")
app.add_typer(services_app, name="services")

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Registered model name. Default: registry.model_name in ./params.yaml, else 'promptcil'.",
        show_default=False,
    ),
]


def _fail(message: str, code: int) -> NoReturn:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """The errors promptcil raises for things a user can fix, as one line and their exit code (a refusal
    of the MLflow server is a refused action: 1)."""
    try:
        yield
    except PromptcilError as err:
        _fail(str(err), err.exit_code)
    except Exception as err:
        if type(err).__name__ == "MlflowException":  # not imported up front: MLflow takes a second to import
            _fail(err.message.strip().splitlines()[0], 1)
        raise


def _model_name(model: str | None) -> str:
    """--model, else registry.model_name of ./params.yaml (that section alone is read), else the default."""
    if model:
        return model
    return (load_section(RegistryConfig, "registry", PARAMS).model_name if PARAMS.is_file()
            else RegistryConfig().model_name)


def _notes(version: dict) -> str:
    parts = []
    if version["reviewer"] and version["review"] == "approved":
        parts.append(f"by {version['reviewer']}" + (f": {version['note']}" if version["note"] else ""))
    elif version["review"] == "rejected":
        parts.append(f"rejected: {version['note']}")
    if version["gate_reasons"]:
        parts.append(f"gate: {version['gate_reasons']}")
    return "; ".join(parts)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- review


@review_app.command("list")
def review_list(model: ModelOption = None) -> None:
    """List every version of the model, newest first: review state, quality gate, metrics, aliases."""
    with _one_line_errors():
        from promptcil import tracking

        name = _model_name(model)
        uri = tracking.configure()
        versions = tracking.list_versions(name)
    console = Console(highlight=False)
    if not versions:
        console.print(f"{name} has no versions ({uri})")
        return
    # Fits 80 columns; the free-text notes (reviewer, reasons) go below, one line per version.
    table = Table(
        title=f"{name} ({uri})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    for column in ("version", "aliases", "review", "gate", "A_last", "A_avg", "forgetting", "created (UTC)"):
        table.add_column(column, justify="right" if column.startswith(("A_", "f")) else "left")
    for v in versions:
        table.add_row(
            v["version"], ", ".join(v["aliases"]), v["review"] or "", v["gate"] or "", _number(v["A_last"]),
            _number(v["A_avg"]), _number(v["forgetting"]), v["created"][:16].replace("T", " "),
        )
    console.print(table)
    for v in versions:
        if notes := _notes(v):
            console.print(f"version {v['version']}: {notes}", markup=False)


@review_app.command("approve")
def review_approve(
    version: Annotated[str, typer.Argument(help="Version number to approve.", show_default=False)],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Who approves (recorded in the version's tags).")],
    note: Annotated[str | None, typer.Option("--note", help="Why it is approved (recorded as review_note).")] = None,
    model: ModelOption = None,
) -> None:
    """Approve a version and make it champion. Refused when the gate failed or it was rejected."""
    with _one_line_errors():
        from promptcil import tracking

        name = _model_name(model)
        tracking.configure()
        approved = tracking.approve(name, version, reviewer, note)
    was = f" (was version {approved['previous_champion']})" if approved["previous_champion"] else ""
    message = f"{name} version {approved['version']} approved by {reviewer}: now champion{was}"
    Console(highlight=False).print(message, markup=False)


@review_app.command("reject")
def review_reject(
    version: Annotated[str, typer.Argument(help="Version number to reject.", show_default=False)],
    reason: Annotated[str, typer.Option("--reason", help="Why it is rejected (recorded as reject_reason).")],
    model: ModelOption = None,
) -> None:
    """Reject a version: it can never be approved. Refused for the current champion."""
    with _one_line_errors():
        from promptcil import tracking

        name = _model_name(model)
        tracking.configure()
        rejected = tracking.reject(name, version, reason)
    Console(highlight=False).print(f"{name} version {rejected['version']} rejected: {reason}", markup=False)


# ---------------------------------------------------------------- predict


@app.command()
def predict(
    model_uri: Annotated[
        str, typer.Argument(help="MLflow model URI, e.g. models:/promptcil@champion.", show_default=False)
    ],
    images: Annotated[
        list[Path],
        typer.Argument(help="Image files: PNG, JPEG, WebP or GIF, any size (sent as they are; the model decodes "
                       "and resizes them).", exists=True, dir_okay=False, show_default=False),
    ],
) -> None:
    """Print 'path<TAB>class name' for each image, as predicted by a registered model."""
    import mlflow.pyfunc
    import numpy as np

    from promptcil import tracking
    from promptcil.errors import ArtifactError

    with _one_line_errors():
        if Path(model_uri).is_file():  # the usual slip: images first
            raise DataError(f"model_uri: {model_uri} is a file, not a model; the model comes first: "
                            "promptcil predict models:/promptcil@champion IMAGE...")
        files = np.empty(len(images), dtype=object)  # the files' bytes: the model's `image` input
        for i, path in enumerate(images):
            try:
                files[i] = path.read_bytes()
            except OSError as err:
                raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
        tracking.configure()
        tracking.champion_of_uri(model_uri)  # models:/NAME@champion: only one `review approve` recorded
        model = mlflow.pyfunc.load_model(model_uri)
        schema = model.metadata.get_input_schema()
        if schema is None or "image" not in schema.input_names():
            raise ArtifactError(f"{model_uri} takes no encoded images (registered before models did): "
                                "register a new version of it")
        try:
            labels = model.predict({"image": files})
        except Exception as err:
            # promptcil.serving.BadRequest, raised by the model's own copy of that module (not this process's)
            if type(err).__name__ != "BadRequest":
                raise
            reason, index = err.reason, err.image_index
            raise DataError(reason if index is None else f"cannot read image {images[index]}: {reason}") from None
    for path, label in zip(images, labels, strict=True):
        typer.echo(f"{path}\t{label}")


# ---------------------------------------------------------------- params


@params_app.command("check")
def params_check(
    path: Annotated[Path, typer.Argument(help="The params file to validate.")] = PARAMS,
    preset: Annotated[
        list[Path] | None,
        typer.Option("--preset", help="Overlay(s) from configs/ merged on top, in order (repeatable)."),
    ] = None,
) -> None:
    """Validate a params file (plus presets) against promptcil's schema; print OK or the one-line error."""
    presets = preset or []
    with _one_line_errors():
        from promptcil.config import load_params

        load_params(path, *presets)
    typer.echo(f"OK {' + '.join(str(p) for p in (path, *presets))}")


# ---------------------------------------------------------------- serve


@app.command()
def serve(
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron", help='Cron schedule, e.g. "0 3 * * *". Default: retrain.cron in ROOT/params.yaml.',
            show_default=False,
        ),
    ] = None,
    root: Annotated[
        Path, typer.Option("--root", help="The workspace: params.yaml, incoming/, outputs/ (default: here).")
    ] = Path("."),
) -> None:
    """Serve the retrain flow on a schedule (Prefect), from any folder.

    Becomes `python -m flows.retrain --serve` (the library never imports Prefect).
    """
    command = [sys.executable, "-m", "flows.retrain", "--serve", "--root", str(root.resolve())]
    command += ["--cron", cron] if cron else []
    # replaced, not a child: a supervisor's SIGTERM to this process id stops the server (a child outlived it)
    os.execv(sys.executable, command)


# ---------------------------------------------------------------- team services and deployments

RootOption = Annotated[Path, typer.Option("--root", help="The workspace (default: here).")]


@services_app.command("start")
def services_start(root: RootOption = Path(".")) -> None:
    """Start PostgreSQL, the MLflow and Prefect servers on it and a worker, on free localhost ports."""
    from promptcil import services

    with _one_line_errors():
        stack = services.start(root)
    console = Console(highlight=False)
    for key, value in stack.env().items():
        console.print(f"{key}={value}", markup=False)
    console.print(f"source {root.resolve() / services.ENV_FILE} to use them; promptcil services stop to stop them",
                  markup=False)


@services_app.command("stop")
def services_stop(root: RootOption = Path(".")) -> None:
    """Stop what `promptcil services start` started for the workspace (by the process ids it recorded)."""
    from promptcil import services

    with _one_line_errors():
        stopped = services.stop(root)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def deploy(root: RootOption = Path(".")) -> None:
    """Deploy the pipeline, retrain and study flows to the Prefect server (prefect.yaml), on the workspace
    ROOT, the retrain scheduled by retrain.cron in ROOT/params.yaml. Needs PREFECT_API_URL (a server)."""
    import os

    import flows
    from promptcil.config import RetrainConfig

    with _one_line_errors():
        if not os.environ.get("PREFECT_API_URL"):
            raise ConfigError("deploy needs a Prefect server: source .services.env (make services) or set "
                              "PREFECT_API_URL")
        project = Path(flows.__file__).resolve().parents[1]
        if not (project / "prefect.yaml").is_file():
            raise ConfigError(f"{project} holds no prefect.yaml: deploy from a promptcil checkout")
        params = root.resolve() / "params.yaml"
        cron = load_section(RetrainConfig, "retrain", params).cron if params.is_file() else RetrainConfig().cron
    env = os.environ | {"PROMPTCIL_ROOT": str(root.resolve()), "PROMPTCIL_RETRAIN_CRON": cron, "PWD": str(project)}
    prefect = Path(sys.executable).parent / "prefect"
    code = subprocess.call([str(prefect), "--no-prompt", "deploy", "--all"], cwd=project, env=env)
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
