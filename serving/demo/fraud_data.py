"""Seeded synthetic card transactions for the fraud demo model (numpy only, no downloads).

Users and merchants carry rolling stats (what a feature store would serve); each
transaction is joined with its user's and merchant's stats into one feature vector by
`join_features`. Fraud depends on the features through thresholds and interactions (a
large amount at night on a young account, foreign card-not-present, risky merchants,
card testing), so a tree ensemble has signal to find that a linear model misses.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from serving.features.spec import (
    FeatureConfig,
    FeatureView,
    RequestField,
    StoredFeature,
    build_vectors,
)

Table = dict[str, np.ndarray]

TXN_COLUMNS = ["amount", "hour", "is_foreign", "card_present"]
USER_STATS = ["txn_count_30d", "avg_amount_30d", "chargeback_rate_90d", "account_age_days"]
MERCHANT_STATS = ["fraud_rate_30d", "txn_count_30d", "category_risk"]
# The model input's columns: request fields, then `<view>.<feature>` from the store.
COLUMNS: list[str] = [
    *TXN_COLUMNS,
    *(f"user_stats.{s}" for s in USER_STATS),
    *(f"merchant_stats.{s}" for s in MERCHANT_STATS),
]
MAX_AGE_S = 7 * 24 * 3600.0

# Risk level of each merchant category (groceries ... gift cards, crypto exchanges).
_CATEGORY_RISK = np.array([0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9])
_CATEGORY_WEIGHT = np.array([0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04])
# Relative activity per hour of day: quiet at night, busiest in the afternoon/evening.
_HOUR_WEIGHT = 0.08 + np.exp(-(((np.arange(24) - 15.0) / 4.5) ** 2))
# Intercept of the fraud logit, set so that about 2% of transactions are fraud.
_BASE_LOGIT = -5.0


@dataclass(frozen=True)
class FraudData:
    """Three tables, each a dict of equal-length numpy columns."""

    users: Table  # user_id + USER_STATS
    merchants: Table  # merchant_id + MERCHANT_STATS
    transactions: Table  # user_id, merchant_id, TXN_COLUMNS, label


def generate(n_transactions: int, seed: int) -> FraudData:
    """Users, merchants and `n_transactions` labelled transactions, fully determined by seed."""
    rng = np.random.default_rng(seed)
    users = _users(rng, max(200, n_transactions // 20))
    merchants = _merchants(rng, max(50, n_transactions // 150))
    return FraudData(users, merchants, _transactions(rng, n_transactions, users, merchants))


def feature_config(data: FraudData) -> FeatureConfig:
    """The manifest's `features` section: request fields, the two views, and defaults
    (each stored feature's median) used when an entity is missing or stale."""

    def view(name: str, entity: str, table: Table, stats: list[str]) -> FeatureView:
        return FeatureView(
            name=name,
            entity=entity,
            max_age_s=MAX_AGE_S,
            features=[
                StoredFeature(name=s, default=round(float(np.median(table[s])), 6)) for s in stats
            ],
        )

    return FeatureConfig(
        input="features",
        policy="default",
        request=[
            RequestField(name="amount", min=0.0),
            RequestField(name="hour", dtype="int64", min=0, max=23),
            RequestField(name="is_foreign", dtype="int64", min=0, max=1),
            RequestField(name="card_present", dtype="int64", min=0, max=1),
        ],
        views=[
            view("user_stats", "user_id", data.users, USER_STATS),
            view("merchant_stats", "merchant_id", data.merchants, MERCHANT_STATS),
        ],
    )


def raw_records(transactions: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Transactions as the gateway receives them: entity keys plus request fields."""
    cols = {
        c: np.asarray(transactions[c]).tolist() for c in ("user_id", "merchant_id", *TXN_COLUMNS)
    }
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def stored_rows(table: Table, key: str, ids: list[str]) -> list[dict[str, float] | None]:
    """Each id's row of a stats table (what Redis holds for it), None if unknown."""
    stats = [c for c in table if c != key]
    index = {k: i for i, k in enumerate(np.asarray(table[key]).tolist())}
    return [
        None if i is None else {s: float(table[s][i]) for s in stats}
        for i in (index.get(k) for k in ids)
    ]


def flatten(data: FraudData) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Feature matrix X (float32 [N, F], COLUMNS order) and labels y (int64 [N]), built by
    the gateway's own transformation (`serving.features.spec.build_vectors`)."""
    raw = raw_records(data.transactions)
    return vectors(feature_config(data), raw, data), data.transactions["label"].astype(np.int64)


def vectors(
    cfg: FeatureConfig, raw: list[dict[str, Any]], data: FraudData
) -> npt.NDArray[np.float32]:
    stored = {
        "user_stats": stored_rows(data.users, "user_id", [r["user_id"] for r in raw]),
        "merchant_stats": stored_rows(
            data.merchants, "merchant_id", [r["merchant_id"] for r in raw]
        ),
    }
    x: npt.NDArray[np.float32] = build_vectors(cfg.resolve_columns(COLUMNS), raw, stored)
    return x


def write_feature_tables(data: FraudData, folder: Path) -> None:
    """CSV files for `serving features load`: one row per entity, stats as columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in (("user_stats", data.users), ("merchant_stats", data.merchants)):
        cols = list(table)
        with (folder / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(zip(*(np.asarray(table[c]).tolist() for c in cols)))


def _rows(ids: np.ndarray, wanted: np.ndarray, kind: str) -> npt.NDArray[np.intp]:
    """Row index in `ids` of each id in `wanted`."""
    index = {k: i for i, k in enumerate(np.asarray(ids).tolist())}
    missing = set(np.asarray(wanted).tolist()) - index.keys()
    if missing:
        raise KeyError(f"unknown {kind} id(s): {sorted(missing)[:5]}")
    return np.fromiter((index[k] for k in np.asarray(wanted).tolist()), np.intp, len(wanted))


def _users(rng: np.random.Generator, n: int) -> Table:
    age = np.clip(rng.gamma(1.2, 450.0, n), 1, 3650).round()
    # Most users never charged back; a minority do now and then, a few often.
    chargeback = np.where(rng.random(n) < 0.85, 0.0, rng.beta(1.0, 25.0, n))
    chargeback = np.where(rng.random(n) < 0.02, rng.beta(3.0, 12.0, n), chargeback)
    return {
        "user_id": np.array([f"u{1000 + i}" for i in range(n)]),
        "txn_count_30d": rng.poisson(rng.gamma(2.0, 10.0, n)).astype(np.float64),
        "avg_amount_30d": rng.lognormal(np.log(45.0), 0.7, n).round(2),
        "chargeback_rate_90d": chargeback.round(4),
        "account_age_days": age,
    }


def _merchants(rng: np.random.Generator, n: int) -> Table:
    risk = _CATEGORY_RISK[rng.choice(len(_CATEGORY_RISK), n, p=_CATEGORY_WEIGHT)]
    # Observed fraud rate: noisy, but higher in risky categories.
    fraud_rate = rng.beta(0.6, 90.0, n) * (0.4 + 4.0 * risk**2)
    return {
        "merchant_id": np.array([f"m{i + 1}" for i in range(n)]),
        "fraud_rate_30d": fraud_rate.round(5),
        "txn_count_30d": rng.lognormal(np.log(800.0), 1.2, n).round(),
        "category_risk": risk,
    }


def _transactions(rng: np.random.Generator, n: int, users: Table, merchants: Table) -> Table:
    # Busy users and merchants appear more often.
    u_w = users["txn_count_30d"] + 1.0
    m_w = merchants["txn_count_30d"] + 1.0
    u = rng.choice(len(u_w), n, p=u_w / u_w.sum())
    m = rng.choice(len(m_w), n, p=m_w / m_w.sum())
    user_avg, age = users["avg_amount_30d"][u], users["account_age_days"][u]
    chargeback = users["chargeback_rate_90d"][u]
    m_fraud, m_risk = merchants["fraud_rate_30d"][m], merchants["category_risk"][m]

    amount = user_avg * rng.lognormal(0.0, 0.6, n)
    amount = np.where(rng.random(n) < 0.04, amount * rng.uniform(3.0, 12.0, n), amount)
    amount = np.where(rng.random(n) < 0.02, rng.uniform(0.5, 2.0, n), amount).round(2)
    hour = rng.choice(24, n, p=_HOUR_WEIGHT / _HOUR_WEIGHT.sum())
    is_foreign = (rng.random(n) < 0.06).astype(np.int64)
    card_present = (rng.random(n) < 0.8 - 0.6 * m_risk).astype(np.int64)

    # Fraud logit: thresholds and interactions rather than additive linear effects.
    big = amount > 3.0 * user_avg
    night = hour <= 5
    young = age < 60
    cnp = card_present == 0
    logit = (
        _BASE_LOGIT
        + 4.0 * (big & night & young)
        + 1.5 * (big & young)
        + 1.0 * big
        + 3.0 * (is_foreign == 1) * cnp
        + 2.0 * (m_fraud > 0.02)
        + 1.5 * ((m_risk >= 0.7) & cnp)
        + 2.0 * (chargeback > 0.08)
        + 3.5 * ((amount < 2.0) & cnp & (m_risk >= 0.5))  # card testing
        + 1.0 * night
        - 1.0 * (age > 1500)
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return {
        "user_id": users["user_id"][u],
        "merchant_id": merchants["merchant_id"][m],
        "amount": amount,
        "hour": hour.astype(np.int64),
        "is_foreign": is_foreign,
        "card_present": card_present,
        "label": label,
    }
