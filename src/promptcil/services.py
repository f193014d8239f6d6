"""A local team stack from packages: PostgreSQL, an MLflow tracking server on it (artifacts proxied), a
Prefect server on it, and a Prefect worker on a process work pool.

`promptcil services start` (`make services`) starts them on free localhost ports and writes
`<root>/.services.env`; sourcing it switches every command (pipeline, retrain, study, review, predict,
serve) to the stack through the variables MLflow and Prefect read themselves (MLFLOW_TRACKING_URI,
PREFECT_API_URL). Without it the embedded default (a sqlite store, Prefect's temporary server) is
unchanged. A team pointing at its own servers sets the same variables. `promptcil services stop`
stops what was started, by the process ids recorded in `<root>/.services/pids.json`.

Nothing here imports MLflow or Prefect: the servers are their own command-line programs. PostgreSQL
refuses to run as root, so as root its cluster belongs to the `postgres` user and lives in the
temporary folder (a folder it can reach whatever the workspace's permissions).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from promptcil.errors import PromptcilError

WORK_POOL = "promptcil"
ENV_FILE = ".services.env"


class ServiceError(PromptcilError):
    """A service that could not start or stop; the message names it and its log."""

    exit_code = 1


@dataclass
class Stack:
    folder: Path
    postgres_data: Path
    postgres_port: int
    mlflow_port: int
    prefect_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "PREFECT_API_URL": self.prefect_api_url,
                "PROMPTCIL_DATABASE_URL": self.database_url}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    if found := shutil.which(name):
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise ServiceError(f"PostgreSQL's {name} not found: install Debian's postgresql package (make services does, "
                           "as root)")
    return str(candidates[-1])


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL's programs run as the `postgres` user when we are root (it refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _cluster_folder(folder: Path) -> Path:
    if os.geteuid() != 0:
        return folder / "postgres"
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"promptcil-postgres-{digest}"


def _wait(what: str, ready: Callable[[], bool], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    raise ServiceError(f"{what} did not come up within {timeout:.0f} s; see {log}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _spawn(name: str, command: list[str], stack: Stack, env: dict[str, str], cwd: Path) -> int:
    """A server in a session of its own (it outlives this command), logging to .services/logs/<name>.log."""
    log = stack.folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    stack.pids[name] = process.pid
    return process.pid


def _postgres_log(stack: Stack) -> Path:
    """Where the `postgres` user can write (as root, beside its cluster: the workspace may not be reachable)."""
    return stack.postgres_data.with_suffix(".log") if os.geteuid() == 0 else stack.folder / "logs" / "postgres.log"


def _start_postgres(stack: Stack) -> None:
    data, log = stack.postgres_data, _postgres_log(stack)
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
        subprocess.run(_as_postgres([postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                     "-E", "UTF8", "--no-instructions"]), check=True, capture_output=True)
    options = f"-p {stack.postgres_port} -k {data} -c listen_addresses=127.0.0.1"
    started = subprocess.run(_as_postgres([postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                           "-w", "start"]), capture_output=True)
    if started.returncode != 0:
        raise ServiceError(f"PostgreSQL did not start; see {log}")
    stack.pids["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
    for database in ("mlflow", "prefect"):
        subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(stack.postgres_port), "-U",
                        "postgres", database], capture_output=True)  # exists already after a restart: fine


def _start_mlflow(stack: Stack, env: dict[str, str], root: Path) -> None:
    bindir = Path(sys.executable).parent
    _spawn("mlflow", [str(bindir / "mlflow"), "server", "--backend-store-uri", f"{stack.database_url}/mlflow",
                      "--artifacts-destination", str(stack.folder / "mlflow-artifacts"), "--host", "127.0.0.1",
                      "--port", str(stack.mlflow_port), "--workers", "1"], stack, env, root)
    _wait("the MLflow server", lambda: _answers(f"{stack.tracking_uri}/health"), stack.folder / "logs" / "mlflow.log")


def _start_prefect(stack: Stack, env: dict[str, str], root: Path) -> None:
    bindir = Path(sys.executable).parent
    server_env = env | {"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:"
                                                                 f"{stack.postgres_port}/prefect"}
    server_env.pop("PREFECT_API_URL", None)
    _spawn("prefect", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                       str(stack.prefect_port)], stack, server_env, root)
    _wait("the Prefect server", lambda: _answers(f"{stack.prefect_api_url}/health"),
          stack.folder / "logs" / "prefect.log")
    subprocess.run([str(bindir / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
                   env=env, check=True, capture_output=True)
    _spawn("worker", [str(bindir / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
           stack, env, root)


def start(root: Path) -> Stack:
    """Start the stack for the workspace `root`; writes <root>/.services.env and <root>/.services/pids.json."""
    root = Path(root).resolve()
    folder = root / ".services"
    if (folder / "pids.json").is_file():
        raise ServiceError(f"services already started for {root} ({folder / 'pids.json'}): "
                           "promptcil services stop first")
    folder.mkdir(parents=True, exist_ok=True)
    stack = Stack(folder, _cluster_folder(folder), free_port(), free_port(), free_port())
    env = os.environ | stack.env() | {"PREFECT_HOME": str(folder / "prefect-home"),
                                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    try:
        _start_postgres(stack)
        _start_mlflow(stack, env, root)
        _start_prefect(stack, env, root)
    except (ServiceError, subprocess.CalledProcessError, OSError) as err:
        _write_pids(stack)
        stop(root)
        detail = err.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
            err, subprocess.CalledProcessError) and err.stderr else []
        raise ServiceError(f"{err}{': ' + detail[0] if detail else ''}") from None
    _write_pids(stack)
    (root / ENV_FILE).write_text("".join(f"export {key}={value}\n" for key, value in stack.env().items()))
    return stack


def _write_pids(stack: Stack) -> None:
    record = asdict(stack) | {"folder": str(stack.folder), "postgres_data": str(stack.postgres_data)}
    (stack.folder / "pids.json").write_text(json.dumps(record, indent=1))


def stop(root: Path) -> list[str]:
    """Stop what `start` started for `root` (worker, Prefect, MLflow, then PostgreSQL); returns their names."""
    root = Path(root).resolve()
    record_file = root / ".services" / "pids.json"
    if not record_file.is_file():
        return []
    record = json.loads(record_file.read_text())
    stopped = []
    for name in ("worker", "prefect", "mlflow"):
        if (pid := record["pids"].get(name)) is not None and _terminate(pid):
            stopped.append(name)
    if "postgres" in record["pids"]:
        data = Path(record["postgres_data"])
        done = subprocess.run(_as_postgres([postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                              capture_output=True)
        if done.returncode == 0:
            stopped.append("postgres")
    record_file.unlink()
    (root / ENV_FILE).unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, grace: float = 20.0) -> bool:
    """SIGTERM the process group `pid` leads (a server and its workers), SIGKILL it after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    return True
