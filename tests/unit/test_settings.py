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


def test_a_wildcard_bind_address_is_reached_on_loopback() -> None:
    assert Settings(http_host="0.0.0.0", http_port=8001).gateway_url() == "http://127.0.0.1:8001"
    assert Settings(http_host="::", http_port=8001).gateway_url() == "http://[::1]:8001"
    assert Settings(http_host="10.1.2.3").gateway_url() == "http://10.1.2.3:8000"
