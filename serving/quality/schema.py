"""Versioned schema migrations of the prediction log's PostgreSQL database.

Migrations are the files `serving/quality/migrations/NNNN_<name>.sql` (shipped in the
wheel), applied in version order, each at most once: `serving_schema_migrations` records
the versions applied. Everything happens in one transaction under a transaction-level
advisory lock, so ingress replicas starting at once (or a replica and `serving log
migrate`) serialize: the first applies what is missing, the others then find nothing to
do. A migration that fails rolls back with everything else of that run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import psycopg

# pg_advisory_xact_lock key of serving's migrations (any constant other tools don't use).
LOCK_KEY = 0x5E41_0001
MIGRATIONS_DIR = "migrations"
_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")

_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_CREATE = (
    "CREATE TABLE IF NOT EXISTS serving_schema_migrations ("
    " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)
_APPLIED = "SELECT version FROM serving_schema_migrations"
_RECORD = "INSERT INTO serving_schema_migrations (version) VALUES (%s)"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for entry in resources.files("serving.quality").joinpath(MIGRATIONS_DIR).iterdir():
        m = _FILE.match(entry.name)
        if m is None:
            continue
        version = int(m.group(1))
        if version in found:
            raise RuntimeError(f"two schema migrations numbered {version}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return tuple(found[v] for v in sorted(found))


def latest() -> int:
    """The schema version this code expects."""
    return migrations()[-1].version


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the missing migrations; returns the versions this call applied."""
    with conn.transaction():
        conn.execute(_LOCK, (LOCK_KEY,))
        conn.execute(_CREATE)
        done = {row[0] for row in conn.execute(_APPLIED)}
        applied = []
        for m in migrations():
            if m.version not in done:
                conn.execute(m.sql.encode())  # no parameters: several statements allowed
                conn.execute(_RECORD, (m.version,))
                applied.append(m.version)
    return applied


async def migrate_async(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    """`migrate` over an asynchronous connection (the prediction log's own)."""
    async with conn.transaction():
        await conn.execute(_LOCK, (LOCK_KEY,))
        await conn.execute(_CREATE)
        done = {row[0] for row in await (await conn.execute(_APPLIED)).fetchall()}
        applied = []
        for m in migrations():
            if m.version not in done:
                await conn.execute(m.sql.encode())
                await conn.execute(_RECORD, (m.version,))
                applied.append(m.version)
    return applied
