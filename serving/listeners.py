"""Where Ray Serve's own listeners in our replicas bind.

Ray Serve (2.60) starts an inter-deployment gRPC server in every replica on all
interfaces (`[::]:0`), with no setting to change it. On a node whose Ray address is
loopback (the local cluster `serving up` starts; see serving.cli.up), nothing outside
this machine may reach a replica, so that server binds to loopback too. On a
multi-node cluster the node's address is not loopback and nothing changes.
"""

from __future__ import annotations

import ipaddress
from typing import Any


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
