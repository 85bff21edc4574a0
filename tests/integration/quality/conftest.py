"""The prediction log's fixtures: a fresh database per test in the session's private
PostgreSQL cluster, and a cluster of a test's own for tests that kill or hang it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import PostgresServer


@pytest.fixture
def log_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database (no tables: the code under test migrates it)."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of the test's own, to stop, kill or pause without disturbing others."""
    server = PostgresServer()
    server.start()
    yield server
    server.remove()
