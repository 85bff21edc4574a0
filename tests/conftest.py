"""Shared fixtures: the repo's demo registry (built by `make models`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "models"


@pytest.fixture(scope="session")
def registry_root() -> Path:
    for name, version in (("fraud", "v1"), ("fraud", "v2"), ("digits", "v1")):
        if not (REGISTRY / name / version / "model.yaml").is_file():
            pytest.fail(f"demo model {name}/{version} missing: run `make models` first")
    return REGISTRY
