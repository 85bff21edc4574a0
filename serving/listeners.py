"""Where listeners in our replicas bind: the gateway's own ports, and Ray Serve's.

Ray Serve (2.60) starts an inter-deployment gRPC server in every replica on all
interfaces (`[::]:0`), with no setting to change it. On a node whose Ray address is
loopback (the local cluster `serving up` starts; see serving.cli.up), nothing outside
this machine may reach a replica, so that server binds to loopback too. On a
multi-node cluster the node's address is not loopback and nothing changes.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any


def shared_port_socket(host: str, port: int, what: str) -> socket.socket:
    """A bound TCP socket on `host:port` with SO_REUSEPORT: the ingress replicas of one
    node share the port and the kernel spreads connections across them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"{what} cannot listen on {host}:{port}: {exc}") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def keep_replica_grpc_on_loopback() -> None:
    """Call in a replica's constructor (it runs before Serve starts that server)."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback", False):
        return
    if not is_loopback(ray.util.get_node_ip_address()):
        return

    def add_port(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
