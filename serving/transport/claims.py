"""Port claims: ingress replicas of one gateway share their ports, a second gateway
fails loudly.

The front doors bind with SO_REUSEPORT so that several ingress replicas on one host
share HTTP and gRPC ports; the kernel would let any other process of the same user
join them as silently (a stale gateway from an earlier run, another cluster's). So
each ingress replica first *claims* its ports: an abstract Unix socket named
`serving-port:<port>:<gateway>:<pid>:<nonce>`, alive exactly as long as the process (the
kernel drops it when the process dies) and visible in /proc/net/unix to every process
in the same network namespace, i.e. on the same host as the port. A claim by another
gateway (another Ray cluster or application) on a port is an error naming its pid.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIX = "serving-port"


class PortTaken(RuntimeError):
    pass


@dataclass(frozen=True)
class Claim:
    port: int
    gateway: str
    pid: int


def claims(port: int) -> list[Claim]:
    """The live claims on `port` in this network namespace (none where /proc/net/unix
    does not exist: claims are a Linux feature, as SO_REUSEPORT's balancing is)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        name = line.rsplit(" ", 1)[-1]
        parts = name.split(":")
        if len(parts) == 5 and parts[0] == "@" + PREFIX and parts[1] == str(port):
            found.append(Claim(port, parts[2], int(parts[3])))
    return found


def foreign(port: int, gateway: str | None) -> list[Claim]:
    """Claims on `port` by any gateway but `gateway` (None: by any gateway at all)."""
    return [c for c in claims(port) if c.gateway != gateway]


def describe(taken: list[Claim], what: str, setting: str) -> str:
    pids = ", ".join(sorted({str(c.pid) for c in taken}))
    return (
        f"{what} port {taken[0].port} is already served by another gateway (pid {pids}); "
        f"stop it or choose another port ({setting})"
    )


class PortClaims:
    """The claims of one ingress replica: taken in its constructor (so a refusal is
    the replica's start-up error, which Serve reports), released with its servers
    (a Service whose stop releases them; the kernel does if the process dies)."""

    def __init__(self, ports: dict[int, tuple[str, str]], gateway: str) -> None:
        self._ports = ports  # port -> (what, setting), e.g. (8000, ("HTTP", "SERVING_..."))
        self._gateway = gateway.replace(":", "_")
        self._socks: list[socket.socket] = []

    def claim(self) -> None:
        if not sys.platform.startswith("linux"):
            return
        for port in self._ports:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            nonce = secrets.token_hex(4)
            sock.bind(f"\0{PREFIX}:{port}:{self._gateway}:{os.getpid()}:{nonce}")
            self._socks.append(sock)
        # Checked after claiming: of two gateways starting at once, both fail.
        for port, (what, setting) in self._ports.items():
            taken = foreign(port, self._gateway)
            if taken:
                self.release()
                raise PortTaken(describe(taken, what, setting))

    async def start(self) -> None:
        """Claimed already (claim())."""

    async def stop(self) -> None:
        self.release()

    def release(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []
