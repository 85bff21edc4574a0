"""Process settings from the environment."""

from __future__ import annotations

import pytest

from serving.settings import Settings


def test_redis_namespace_reads_its_new_and_its_former_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SERVING_REDIS_NAMESPACE", raising=False)
    monkeypatch.delenv("SERVING_FEATURE_NAMESPACE", raising=False)
    assert Settings().redis_namespace == "serving"
    monkeypatch.setenv("SERVING_FEATURE_NAMESPACE", "legacy")
    assert Settings().redis_namespace == "legacy"
    monkeypatch.setenv("SERVING_REDIS_NAMESPACE", "current")
    assert Settings().redis_namespace == "current"  # the new name wins
    # Replicas rebuild the settings from their dump.
    assert Settings.model_validate(Settings().model_dump()).redis_namespace == "current"
    assert Settings(redis_namespace="kw").redis_namespace == "kw"
