"""Every Redis key is built in serving/keys.py: no other module spells one."""

from __future__ import annotations

import re

from serving import keys
from tests.conftest import ROOT

# The key parts that follow the namespace (serving.keys).
KEY_PARTS = re.compile(r":(fv|routing|routing-updates|rollout|rollout-leader|stats|pred|acc)[:\"']")


def test_keys_are_namespaced() -> None:
    ns = "proj"
    built = [
        keys.feature(ns, "user_stats", "u1"),
        keys.routing(ns, "m"),
        keys.routing_channel(ns),
        keys.rollout(ns, "m"),
        keys.history(ns, "m"),
        keys.analyzed(ns, "m"),
        keys.leader(ns),
        keys.stats(ns, "m", "v1", 1700000000),
        keys.prediction(ns, "rid"),
        keys.accuracy(ns, "m", "v1", 1700000040),
    ]
    assert all(k.startswith("proj:") for k in built)
    assert len(set(built)) == len(built)
    assert keys.feature(ns, "user_stats", "u1") == "proj:fv:user_stats:u1"


def test_no_other_module_builds_a_key() -> None:
    spelled = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "serving").rglob("*.py")
        if path.name != "keys.py" and KEY_PARTS.search(path.read_text())
    }
    assert spelled == set()
