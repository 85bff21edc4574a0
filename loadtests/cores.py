"""Cores apart for the overload step: the system under test on all CPUs but one, the
generator on the last, so that a refusal's latency and the goodput are the server's
and not the generator's own lag (on 2 cores, sharing them the generator could not
offer 3x the gateway's capacity and its send lag reached a second).

Affinity is per thread on Linux: every thread of every process in each tree is moved,
and threads created later inherit their creator's. Processes are found through /proc.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces: split after its ")".
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def tree_of(root: int, children: dict[int, list[int]] | None = None) -> set[int]:
    """`root` and every process below it."""
    children = _children() if children is None else children
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def pin(pids: set[int], cpus: set[int]) -> int:
    """Every thread of `pids` onto `cpus`; the number of threads moved."""
    moved = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cpus)
                moved += 1
    return moved


@contextlib.contextmanager
def apart(generator: int) -> Iterator[tuple[set[int], set[int]] | None]:
    """This process's tree (the served system: Ray, Redis, the gateway) on all CPUs
    but the last, the generator's tree on the last; everything back on all CPUs
    afterwards. None (and nothing moved) with fewer than 2 CPUs."""
    cpus = set(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield None
        return
    last = {max(cpus)}
    served = cpus - last
    children = _children()
    generator_tree = tree_of(generator, children)
    system = tree_of(os.getpid(), children) - generator_tree
    try:
        pin(system, served)
        pin(generator_tree, last)
        yield served, last
    finally:
        pin(tree_of(os.getpid()), cpus)
