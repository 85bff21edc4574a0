"""Integration fixtures: a redis-server of a test's own; the two gRPC servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import RedisServer
from tests.integration.transport.grpc_servers import running  # noqa: F401  (a fixture)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """Its own server, for tests that stop, restart or block it: doing that to the
    session's server would disturb other tests' state."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()
