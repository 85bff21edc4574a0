"""Shared fixtures: the repo's demo registry (built by `make models`), a private
redis-server, a private PostgreSQL cluster, a private MLflow server. Every test under
tests/integration and tests/e2e carries that layer's marker (`-m "not e2e"` runs the
fast layers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
# The CLI as a user runs it, from this checkout's environment.
SERVING = [sys.executable, "-m", "serving.cli"]
REGISTRY = ROOT / "models"
LAYERS = ("integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = item.path.relative_to(ROOT / "tests").parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Touch:
    """Unpickling it creates `path`: a file that exists proves something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (str(self.path), "w"))


class RedisServer:
    """A redis-server child process that tests may stop and start again (same port)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        pytest.fail(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, decode_responses=True)


@pytest.fixture(scope="session")
def registry_root() -> Path:
    for name, version in (("fraud", "v1"), ("fraud", "v2"), ("digits", "v1")):
        if not (REGISTRY / name / version / "model.yaml").is_file():
            pytest.fail(f"demo model {name}/{version} missing: run `make models` first")
    return REGISTRY


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port (never the shared one on 6379)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class PostgresServer:
    """A private PostgreSQL cluster (initdb into a temporary folder; the postmaster a
    child process) that tests may stop, kill, pause and start again on the same port.

    initdb and postgres refuse to run as root: as root they run as the `postgres` user."""

    def __init__(self) -> None:
        initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
        if initdb is None or postgres is None:
            pytest.fail("PostgreSQL (initdb, postgres) is not installed")
        self.initdb, self.postgres = initdb, postgres
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="serving-pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.dsn = self.database_dsn("postgres")
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._user = {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            [self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync", "--no-instructions"],
            cwd=self.dir, check=True, capture_output=True, **self._user,
        )  # fmt: skip

    def database_dsn(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        with self.logfile.open("ab") as logf:
            self.proc = subprocess.Popen(
                [self.postgres, "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "full_page_writes=off"],
                cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT, **self._user,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace")[-2000:]
                pytest.fail(f"postgres on port {self.port} exited:\n{tail}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                time.sleep(0.05)
        pytest.fail(f"postgres on port {self.port} did not start")

    def _children(self) -> list[int]:
        """The postmaster's child processes (backends, background workers)."""
        if self.proc is None:
            return []
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def stop(self, kill: bool = False) -> None:
        """Fast shutdown (SIGINT), or SIGKILL as a crash would; either way, wait until
        every server process is gone so that start() can follow at once."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            children = self._children()
            self.resume()
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            self.proc.wait(timeout=30)
            deadline = time.monotonic() + 10
            while children and time.monotonic() < deadline:
                children = [pid for pid in children if _alive(pid)]
                time.sleep(0.02)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP every server process: PostgreSQL hung, connections open but silent."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in [self.proc.pid, *self._children()]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its DSN."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_dsn(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process still runs (a zombie has let go of everything: not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster on a free port (tests make fresh databases in it)."""
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


class MlflowServer:
    """A private MLflow tracking server and model registry (`mlflow server`: SQLite as
    the backend store, a local artifact root, artifacts served through the server) on a
    free port, in a process group of its own (uvicorn runs as its child). Starting
    takes ~8-15 s on 2 cores (database migrations, the app's imports): one per session.
    MLflow's job runner (seven more worker processes) is off; nothing here uses it."""

    def __init__(self, root: Path) -> None:
        venv_binary = Path(sys.executable).with_name("mlflow")
        binary = str(venv_binary) if venv_binary.is_file() else shutil.which("mlflow")
        if binary is None:
            pytest.fail("mlflow is not installed (pip install -e '.[dev]')")
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [self.binary, "server",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.root, env=env, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server on port {self.port} exited:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"mlflow server on port {self.port} not healthy within {timeout_s:g} s")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A private MLflow server for the session (tests register models of their own
    names in it). MLflow clients in this process send no telemetry."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def run_serving(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One `serving` command in the project folder; wide output so lines stay whole."""
    return subprocess.run(
        [*SERVING, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=ROOT,
    )
