"""The `serving` command against a running gateway, and `serving up` itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, SERVING, RedisServer
from tests.conftest import run_serving as run
from tests.e2e.conftest import TOKEN, GatewayUnderTest, free_port
from tests.e2e.test_gateway import records


def test_cli_predict_and_models_list(gateway: GatewayUnderTest, tmp_path: Path) -> None:
    file = tmp_path / "req.json"
    file.write_text(json.dumps({"instances": records(gateway.registry, 3)}))
    out = run(
        "predict",
        "fraud",
        "--version",
        "v1",
        "--instances",
        f"@{file}",
        "--json",
        "--url",
        gateway.url,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["version"] == "v1" and len(body["predictions"]) == 3
    out = run("predict", "nope", "-i", "[[1]]", "--url", gateway.url)
    assert out.returncode == 1 and "404 not_found" in out.stderr
    out = run("predict", "fraud", "-i", "[[1,", "--url", gateway.url)
    assert out.returncode == 1 and "not valid JSON" in out.stderr
    out = run("models", "list", "--url", gateway.url)
    assert out.returncode == 0, out.stderr
    assert "fraud" in out.stdout and "digits" in out.stdout and "AVAILABLE" in out.stdout


def test_cli_batching_show_and_set(gateway: GatewayUnderTest) -> None:
    env = {"SERVING_ADMIN_TOKEN": TOKEN}
    out = run("models", "batching", "fraud", "-v", "v1", "--url", gateway.url, env=env)
    assert out.returncode == 0, out.stderr
    before = json.loads(out.stdout)
    out = run(
        "models",
        "batching",
        "fraud",
        "-v",
        "v1",
        "--batch-wait-ms",
        "3",
        "--url",
        gateway.url,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    out = run("models", "batching", "fraud", "-v", "v1", "--url", gateway.url, env=env)
    after = json.loads(out.stdout)
    assert after["batch_wait_timeout_s"] == pytest.approx(0.003)
    assert after["replica"] == before["replica"]
    out = run(
        "models",
        "batching",
        "fraud",
        "-v",
        "v1",
        "--url",
        gateway.url,
        env={"SERVING_ADMIN_TOKEN": "wrong"},
    )
    assert out.returncode == 1 and "401" in out.stderr


def test_cli_unreachable_gateway_is_a_clear_error() -> None:
    out = run("models", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach the gateway" in out.stderr


LOOPBACK = re.compile(r"(127\.0\.0\.1|\[::1\]|\[::ffff:127\.0\.0\.1\]):\d+ ")


def _tree(root: int) -> set[int]:
    """`root` and every process under it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def listening(root: int) -> list[str]:
    """`address process` for every TCP listener of a process under `root` (or itself)."""
    tree = _tree(root)
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [
        f"{line.split()[3]} {line.split()[-1]}"
        for line in out.splitlines()
        if tree & {int(p) for p in re.findall(r"pid=(\d+)", line)}
    ]


class KeepAliveLoad:
    """Clients each sending one request after another on a keep-alive connection,
    recording each outcome: the status, `refused` (no connection) or what went wrong."""

    def __init__(self, port: int, path: str, body: bytes, connections: int) -> None:
        self._request = (
            f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self._port = port
        self._stop = threading.Event()
        self.outcomes: list[str] = []
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(connections)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        sock: socket.socket | None = None
        while not self._stop.is_set():
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", self._port), timeout=20)
                except OSError:
                    self.outcomes.append("refused")
                    time.sleep(0.05)
                    continue
            try:
                sock.sendall(self._request)
                status, close = _read_answer(sock)
                self.outcomes.append(status)
            except OSError as exc:
                self.outcomes.append(f"{type(exc).__name__}: {exc}")
                close = True
            if close:
                sock.close()
                sock = None
            time.sleep(0.005)

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return self.outcomes


def _read_answer(sock: socket.socket) -> tuple[str, bool]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed without an answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    while len(rest) < int(fields.get(b"content-length", b"0")):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        rest += chunk
    return lines[0].split()[1].decode(), fields.get(b"connection") == b"close"


def start_serving_up(
    tmp_path: Path,
    redis_url: str,
    namespace: str,
    *,
    command: str = "up",
    port_env: str = "SERVING_HTTP_PORT",
    serving: list[str] | None = None,
    cwd: Path = ROOT,
    **settings: str,
) -> tuple[subprocess.Popen[str], int, list[str]]:
    """`serving up` as `make up` runs it (its own local Ray), on free ports; returns once
    it printed `ready` (the process, its HTTP port, what it printed so far). The caller
    kills its process group in the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            port_env: str(port),
            "SERVING_GRPC_PORT": str(free_port()),  # never share :9000 with a running gateway
            "SERVING_ADMIN_TOKEN_FILE": str(tmp_path / "token"),
            "SERVING_RAY_NUM_CPUS": "4",
            "SERVING_METRICS_PORT": str(free_port()),
            "SERVING_RAY_PROXY_PORT": str(free_port()),
            "SERVING_REDIS_URL": redis_url,
            "SERVING_REDIS_NAMESPACE": namespace,
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
    )
    proc = subprocess.Popen(
        [*(serving or SERVING), command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready"):
            break
    if not any(line.startswith("ready") for line in lines):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("".join(lines[-30:]))
    return proc, port, lines


def test_serving_up_serves_then_stops_on_sigterm(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`serving up` as `make up` runs it: its own local Ray, deploy, ready, SIGTERM."""
    # An empty namespace: `serving up` loads the feature tables.
    # A generous feature deadline: the first lookups on a busy 2-core machine may take
    # longer than the 20 ms default, and this test is about serving, not that deadline.
    proc, port, lines = start_serving_up(
        tmp_path, redis_server.url, "up-test", SERVING_FEATURE_TIMEOUT_S="0.5"
    )
    try:
        assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
        assert any("loaded" in line and "user_stats" in line for line in lines), lines
        # Ray's servers and ours: all on loopback (was: GCS, raylet, workers, agents and
        # the metrics endpoint on every interface).
        exposed = [a for a in listening(proc.pid) if not LOOPBACK.match(a)]
        assert not exposed, exposed
        rec = records(registry_root, 1)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/fraud:predict", json={"instances": rec}, timeout=30
        )
        assert r.status_code == 200 and "degraded" not in r.json(), r.text
        x = np.load(registry_root / "digits" / "heldout.npz")["X"][:2]
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/digits:predict",
            json={"instances": x.tolist()},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        # Under load on keep-alive connections, SIGTERM to the whole process group (as
        # Ctrl-C or a supervisor sends it, Ray's processes included).
        body = json.dumps({"instances": x[:1].tolist()}).encode()
        load = KeepAliveLoad(port, "/v1/models/digits:predict", body, connections=4)
        time.sleep(1.0)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
        outcomes = load.stop()
        assert proc.returncode == 0, rest[-3000:]
        assert "stopped." in rest
        assert took < 15.0, f"stopped {took:.1f} s after SIGTERM"
        # Every request sent was answered (200, or 503 when it could not be served); new
        # connections were refused once the listener closed. None was left unanswered.
        unanswered = [o for o in outcomes if o not in ("200", "503", "refused")]
        assert not unanswered, unanswered[:5]
        assert outcomes.count("200") > 20
        token = (tmp_path / "token").read_text().strip()
        assert token not in "".join(lines) + rest  # the token file is named, never shown
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serving_up_with_rays_haproxy_ingress(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SERVING_HTTP_MODE=haproxy: Ray Serve's HAProxy ingress is the front door on the
    gateway's port (the machine's haproxy, started by Serve), and predictions answer
    through it; a second `serving up` on the same ports refuses at once, naming why."""
    proc, port, lines = start_serving_up(
        tmp_path, redis_server.url, "haproxy-test", SERVING_HTTP_MODE="haproxy"
    )
    try:
        assert any("haproxy" in cmd for _, cmd in ray_processes(proc.pid))
        x = np.load(registry_root / "digits" / "heldout.npz")["X"][:1]
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/digits:predict",
            json={"instances": x.tolist()},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["version"] == "v1", r.text
        # The gRPC port is this gateway's: another `serving up` on it fails in a second.
        grpc_port = next(
            int(line.rsplit(":", 1)[1]) for line in lines[-5:] if "gRPC 127.0.0.1:" in line
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        second = subprocess.run(
            [*SERVING, "up"],
            cwd=ROOT,
            env={**env, "SERVING_GRPC_PORT": str(grpc_port), "SERVING_HTTP_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"gRPC port {grpc_port} is already served by another gateway" in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_losing_one_of_two_ingress_replicas(
    registry_root: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGKILL one of two ingress replicas under load: at most the requests on its
    connections fail (one per client connection: the one in flight), clients connect
    again and are served by the survivor, and Serve brings a replacement."""
    import yaml

    dep = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    dep["ingress"]["num_replicas"] = 2
    dep["registry"] = str(registry_root)
    dep["feature_tables"] = []
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(dep))
    proc, port, _ = start_serving_up(
        tmp_path, redis_server.url, "two-ingress", SERVING_CONFIG=str(config)
    )
    try:
        gateways = [p for p in ray_processes(proc.pid) if "ServeReplica:gateway:Gateway" in p[1]]
        assert len(gateways) == 2, gateways
        x = np.load(registry_root / "digits" / "heldout.npz")["X"][:1]
        body = json.dumps({"instances": x.tolist()}).encode()
        load = KeepAliveLoad(port, "/v1/models/digits:predict", body, connections=4)
        time.sleep(2.0)
        before = len(load.outcomes)
        os.kill(gateways[0][0], signal.SIGKILL)
        time.sleep(5.0)
        at_5s = len(load.outcomes)
        time.sleep(3.0)
        outcomes = load.stop()
        after_kill = outcomes[before:]
        failed = [o for o in after_kill if o not in ("200", "503")]
        assert len(failed) <= 4, failed  # at most the one in flight per connection
        # Within 5 s every client is served again: the last 3 s are all answered.
        assert outcomes[at_5s:] and all(o in ("200", "503") for o in outcomes[at_5s:])
        assert outcomes[at_5s:].count("200") > 50
        # Serve replaces the dead replica.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alive = [p for p in ray_processes(proc.pid) if "ServeReplica:gateway:Gateway" in p[1]]
            if len(alive) == 2 and gateways[0][0] not in [p[0] for p in alive]:
                break
            time.sleep(1.0)
        else:
            raise AssertionError("no replacement ingress replica")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def ray_processes(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under `root`."""
    out = []
    for pid in _tree(root):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append((pid, cmd))
    return out
