import random

import pytest

from serving.rollouts.table import RoutingTable, bucket, choose, sample_shadow


def table(weight: float, **kw: object) -> RoutingTable:
    return RoutingTable(
        model="fraud", stable="v1", canary="v2", canary_weight=weight, sticky_key="user_id", **kw
    )  # type: ignore[arg-type]


def test_sticky_assignment_is_deterministic() -> None:
    t = table(25)
    first = [choose(t, f"u{i}") for i in range(1000)]
    again = [choose(t, f"u{i}") for i in range(1000)]
    assert first == again
    assert bucket("fraud", "u1") == bucket("fraud", "u1")
    assert 0 <= bucket("fraud", "u1") < 10_000


@pytest.mark.parametrize("weight", [5, 25, 50])
def test_canary_share_over_10000_keys_is_within_1_5_points(weight: float) -> None:
    t = table(weight)
    share = sum(choose(t, f"user-{i}")[1] == "canary" for i in range(10_000)) / 100
    assert abs(share - weight) <= 1.5, share


def test_raising_the_weight_never_moves_a_key_back_to_stable() -> None:
    keys = [f"k{i}" for i in range(5000)]
    at5 = {k for k in keys if choose(table(5), k)[1] == "canary"}
    at25 = {k for k in keys if choose(table(25), k)[1] == "canary"}
    assert at5 <= at25 and len(at25) > len(at5)


def test_weight_resolution_is_a_hundredth_of_a_percent() -> None:
    t = table(0.01)
    share = sum(choose(t, f"x{i}")[1] == "canary" for i in range(200_000)) / 200_000
    assert 0.00003 < share < 0.0002


def test_no_canary_and_zero_weight_route_to_stable() -> None:
    assert choose(RoutingTable(model="m", stable="v1"), "k") == ("v1", "stable")
    assert choose(table(0), "k") == ("v1", "stable")
    assert choose(table(100), "k") == ("v2", "canary")


def test_unsticky_requests_are_split_at_random() -> None:
    rng = random.Random(1)
    t = table(30)
    share = sum(choose(t, None, rng)[1] == "canary" for _ in range(10_000)) / 100
    assert abs(share - 30) < 2


def test_shadow_sampling() -> None:
    rng = random.Random(2)
    t = RoutingTable(model="m", stable="v1", shadow="v3", shadow_sample=0.1)
    hits = sum(sample_shadow(t, rng) == "v3" for _ in range(10_000))
    assert 850 < hits < 1150
    assert sample_shadow(RoutingTable(model="m", stable="v1"), rng) is None


def test_table_validation() -> None:
    with pytest.raises(ValueError, match="differ"):
        RoutingTable(model="m", stable="v1", canary="v1")
    with pytest.raises(ValueError, match="needs a canary"):
        RoutingTable(model="m", stable="v1", canary_weight=5)
    with pytest.raises(ValueError):
        table(100.5)
