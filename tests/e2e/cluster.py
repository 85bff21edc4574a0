"""A multi-node Ray cluster on one machine: each node a host of its own.

Every node is a network namespace (`ip netns`) with its own address on a bridge
(10.231.<n>.0/24, the machine itself at .254), so each node has its own ports (every
ingress replica serves :8000 on its node's address, as on real hosts) and a node can
be killed whole: SIGKILL to every process in its namespace. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTED = "Ray runtime started."
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def can_make_hosts() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    probe = f"srvprobe{os.getpid() % 10000}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"ip netns unavailable: {exc}"
    return None


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    temp_dir: str  # Ray's, one per node (its sockets must not collide with another's)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
        """A process inside this node's namespace (output to `log`)."""
        out = log.open("a")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def kill(self) -> int:
        """SIGKILL every process of the node (raylet, workers, everything); how many."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self.procs = []
        return len(pids)


class Hosts:
    """A bridge and one namespace per node; `close` removes everything it made."""

    def __init__(self, names: list[str], subnet: int = 231) -> None:
        tag = f"{os.getpid() % 100000:05d}"
        self.bridge = f"srvbr{tag}"
        self.host_ip = f"10.{subnet}.0.254"
        self.nodes: list[Node] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(names):
            ns, outer, inner = f"srv{tag}{name}", f"sv{tag}h{i}", f"sv{tag}n{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            ip = f"10.{subnet}.0.{i + 1}"
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.nodes.append(Node(name, ns, ip, f"/tmp/{ns}"))

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", node.netns)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)


def ray_start(
    node: Node,
    env: dict[str, str],
    log: Path,
    *,
    head: Node | None = None,
    num_cpus: float,
    resources: str | None = None,
) -> None:
    """`ray start --block` on the node, in its namespace; returns once the node runs
    (its log says so)."""
    args = [str(VENV_BIN / "ray"), "start", "--block", f"--node-ip-address={node.ip}"]
    args += [f"--num-cpus={num_cpus:g}", "--disable-usage-stats", f"--temp-dir={node.temp_dir}"]
    if head is None:
        args += ["--head", "--port=6379", "--include-dashboard=false"]
    else:
        args += [f"--address={head.ip}:6379"]
    if resources:
        args += [f"--resources={resources}"]
    start = log.read_text().count(STARTED) if log.exists() else 0
    proc = node.run(args, env, log)
    deadline = time.monotonic() + 120
    while log.read_text().count(STARTED) == start:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start on {node.name} failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
