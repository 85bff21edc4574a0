"""Port claims: one gateway's replicas share a port; another gateway is refused."""

from __future__ import annotations

import os

import pytest

from serving.transport import claims
from serving.transport.claims import PortClaims, PortTaken
from tests.conftest import free_port


def test_replicas_of_one_gateway_share_a_port_and_another_gateway_is_refused() -> None:
    port = free_port()
    ports = {port: ("HTTP", "SERVING_HTTP_PORT")}
    first, sibling = PortClaims(ports, "gw-a"), PortClaims(ports, "gw-a")
    first.claim()
    sibling.claim()
    try:
        assert {c.gateway for c in claims.claims(port)} == {"gw-a"}
        other = PortClaims(ports, "gw-b")
        with pytest.raises(PortTaken, match=rf"HTTP port {port} .* \(pid {os.getpid()}\)"):
            other.claim()
        assert claims.foreign(port, "gw-a") == []  # the refused one left no claim
        assert [c.pid for c in claims.foreign(port, None)] == [os.getpid()] * 2
    finally:
        first.release()
        sibling.release()
    # Gone with the replicas that held them: the port is anyone's again.
    assert claims.claims(port) == []
    other = PortClaims(ports, "gw-b")
    other.claim()
    other.release()
