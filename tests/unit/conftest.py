"""Unit tests run without the outside world: no network sockets, no real model files.
A test that needs either belongs in tests/integration (the guards below say so)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

_NETWORK = (socket.AF_INET, socket.AF_INET6)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Binding or connecting an IP socket fails the test (asyncio's own socketpair, a
    Unix socket, still works)."""

    def refuse(original: Any) -> Any:
        def guarded(self: socket.socket, *args: Any) -> Any:
            if self.family in _NETWORK:
                pytest.fail("a unit test opened a network socket: make it an integration test")
            return original(self, *args)

        return guarded

    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse(getattr(socket.socket, name)))
    yield


@pytest.fixture(scope="session")
def registry_root() -> None:
    pytest.fail("a unit test asked for the real model registry: make it an integration test")
