"""Throw-away servers for the scale-out tests: a PostgreSQL cluster and an MLflow tracking server backed by it.

PostgreSQL refuses to run as root, so when the tests run as root the cluster is made and run by the `postgres` user
(`runuser -u postgres --`), in a temp folder it owns, on a free port on 127.0.0.1 with trust authentication (nothing
listens beyond localhost). Teardown always stops both servers and removes the folders. Tests skip with a clear reason
only when the PostgreSQL binaries are absent (`apt-get install -y postgresql` provides them; `.ci/run` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest


def pg_bin() -> Optional[Path]:
    """The folder with initdb/pg_ctl: $LORA_LAB_PG_BIN, else the newest /usr/lib/postgresql/<version>/bin."""
    env = os.environ.get("LORA_LAB_PG_BIN")
    candidates = (
        [Path(env)]
        if env
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def server_env() -> dict[str, str]:
    """The environment of an `mlflow server` / `mlflow ui` started by a test: without MLflow's job execution (on by
    default since MLflow 3.x: a job runner and two huey consumers, each a Python process importing MLflow, for GenAI
    jobs no test uses; measured 20 s of CPU in the first 15 s after a start, against 7 s without them on 2 cores).
    What lora_lab talks to, the tracking REST API and the UI, is the same either way."""
    return dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A PostgreSQL cluster in a temp folder: `start()`, `create_db(name)` -> URL, `halt()` and `resume()` (the same
    server stopped and started again), `stop()` (for good: the folder goes)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lora_lab_pg_"))  # not under pytest's 0700 tmp: postgres must enter it
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else os.environ.get("USER", "postgres")
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> "Postgres":
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        )
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again), on the same port and data: what a restarted database looks like to clients."""
        opts = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=300 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        self.started = True

    def halt(self) -> None:
        """Stop the server, keeping its data (`-m fast`: open sessions are cut, as in a restart or a crash)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.started = False

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def log(self) -> str:
        with contextlib.suppress(Exception):
            return (self.root / "server.log").read_text()[-4000:]
        return ""

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a database backend and a local artifact folder; `url` once healthy."""

    def __init__(self, backend_uri: str, artifacts: Path, workers: int = 2) -> None:
        self.backend_uri, self.artifacts, self.workers = backend_uri, artifacts, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = artifacts.parent / f"mlflow-server-{self.port}.log"

    def start(self, timeout: float = 180) -> "MlflowServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow_cli = [sys.executable, "-m", "mlflow"]
        cmd = [
            *mlflow_cli,
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--artifacts-destination",
            self.artifacts.as_uri(),
            "--workers",
            str(self.workers),
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, env=server_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        with contextlib.suppress(Exception):
            return self.log_path.read_text()[-4000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def require_postgres() -> Path:
    """The PostgreSQL bin folder, or skip the test saying what is missing."""
    found = pg_bin()
    if found is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql "
            "(or set LORA_LAB_PG_BIN)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser`: cannot start PostgreSQL as the postgres user")
    return found


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    pg = Postgres(require_postgres())
    try:
        yield pg.start()
    finally:
        pg.stop()


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(backend_uri, artifacts)
    try:
        yield server.start()
    finally:
        server.stop()
