"""loadtests.cores: the generator's process tree on the last CPU, this process's other
children (the served system) on the rest, and everything back afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from loadtests import cores


def _affinity(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


def test_the_generator_and_the_system_on_cores_apart() -> None:
    everything = _affinity(0)
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    # The "generator" has a child of its own, which must move with it.
    spawn = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(30)"
    generator = subprocess.Popen([sys.executable, "-c", spawn, *sleeper])
    system = subprocess.Popen(sleeper)
    try:
        deadline = time.monotonic() + 10
        while len(cores.tree_of(generator.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cores.tree_of(generator.pid)) == 2
        with cores.apart(generator.pid) as split:
            if len(everything) < 2:
                assert split is None
                return
            assert split is not None
            served, last = split
            assert last == {max(everything)} and served == everything - last
            for pid in cores.tree_of(generator.pid):
                assert _affinity(pid) == last
            assert _affinity(system.pid) == served and _affinity(0) == served
        for pid in (generator.pid, system.pid, os.getpid()):
            assert _affinity(pid) == everything
    finally:
        for p in (generator, system):
            p.kill()
        for pid in cores.tree_of(generator.pid) - {generator.pid}:
            os.kill(pid, 9)
