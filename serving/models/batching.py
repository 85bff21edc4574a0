"""Pure helpers to merge requests into one batch and split results back.

Invariant: `split(run(merge(parts)), counts)` gives each part exactly the rows it sent,
in order. Parts whose non-batch dimensions differ (variable axes) cannot share one
array; `group_compatible` separates them so each group is one runtime call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.models.registry import Arrays


def rows(arrays: Arrays) -> int:
    """Number of instances in a request (the batch axis of its first input)."""
    return int(next(iter(arrays.values())).shape[0])


def signature(arrays: Arrays) -> tuple[tuple[int, ...], ...]:
    return tuple(a.shape[1:] for a in arrays.values())


def group_compatible(parts: Sequence[Arrays]) -> list[list[int]]:
    """Indices of parts grouped by identical per-instance shapes, first-seen order."""
    if len(parts) == 1:
        return [[0]]
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for i, p in enumerate(parts):
        groups.setdefault(signature(p), []).append(i)
    return list(groups.values())


def merge(parts: Sequence[Arrays]) -> tuple[Arrays, list[int]]:
    """Concatenate compatible parts along the batch axis; returns rows per part."""
    counts = [rows(p) for p in parts]
    if len(parts) == 1:
        return dict(parts[0]), counts
    names = parts[0].keys()
    return {n: np.concatenate([p[n] for p in parts], axis=0) for n in names}, counts


def split(outputs: Arrays, counts: Sequence[int]) -> list[Arrays]:
    """Inverse of `merge` on the outputs: one dict of arrays per part."""
    total = sum(counts)
    for name, arr in outputs.items():
        if arr.shape[0] != total:
            raise ValueError(f"output {name!r} has {arr.shape[0]} rows, expected {total}")
    if len(counts) == 1:
        return [outputs]
    bounds = np.cumsum(counts)[:-1]
    per_output = {n: np.split(a, bounds) for n, a in outputs.items()}
    return [{n: per_output[n][i] for n in outputs} for i in range(len(counts))]


def chunk(arrays: Arrays, max_rows: int) -> list[Arrays]:
    """Cut one request into pieces of at most `max_rows` instances (views, no copy)."""
    n = rows(arrays)
    if n <= max_rows:
        return [arrays]
    return [{k: v[i : i + max_rows] for k, v in arrays.items()} for i in range(0, n, max_rows)]


def concat_outputs(pieces: Sequence[Arrays]) -> Arrays:
    """Rejoin the outputs of the pieces made by `chunk`."""
    if len(pieces) == 1:
        return pieces[0]
    return {k: np.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}
