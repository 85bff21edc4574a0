"""Podman for the image tests: a local base image made with debootstrap (no container
registry is reachable here), builds that take their packages where this machine's pip
does, and containers on the host's network.

The base stands in for the Dockerfiles' default (python:3.11-slim-bookworm: Debian
bookworm's Python 3.11 with `venv`, CA certificates and netbase); the Dockerfiles take
it through their BASE_IMAGE build arg.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

# Bump the suffix when the package list changes: the tag names the base's contents.
BASE_TAG = "localhost/serving-test-base:bookworm-py311-1"
BASE_PACKAGES = "python3,python3-venv,ca-certificates,netbase"
MIRROR = os.environ.get("SERVING_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class Podman:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("podman")
        if binary is None or shutil.which("runc") is None:
            pytest.fail("podman and runc are not installed (make test installs Debian's)")
        conf = workdir / "containers.conf"
        # Containers inherit no ulimits this sandbox cannot grant.
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.argv = [binary, "--runtime", "runc", "--cgroup-manager", "cgroupfs"]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        if log is not None:  # long builds: the whole output to a file, the tail on failure
            with log.open("w") as out:
                proc = subprocess.run(
                    [*self.argv, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                    text=True, timeout=timeout,
                )  # fmt: skip
            if check and proc.returncode != 0:
                pytest.fail(f"podman {args[0]} failed ({proc.returncode}):\n{tail(log)}")
            return subprocess.CompletedProcess(proc.args, proc.returncode, "", "")
        proc = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} failed: {proc.stderr[-3000:]}")
        return proc

    def has_image(self, tag: str) -> bool:
        return self.run("image", "exists", tag, check=False).returncode == 0

    def base_image(self, workdir: Path) -> str:
        """The local Debian bookworm base, made once per machine (debootstrap, ~1 min)."""
        if self.has_image(BASE_TAG):
            return BASE_TAG
        if shutil.which("debootstrap") is None:
            pytest.fail("debootstrap is not installed (make test installs Debian's)")
        root = workdir / "rootfs"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
             str(root), MIRROR],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"debootstrap failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / cache).glob("*"):
                if f.is_file():
                    f.unlink()
        archive = workdir / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        self.run("import", str(archive), BASE_TAG, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
        archive.unlink()
        return BASE_TAG

    @contextmanager
    def container(self, image: str, name: str, *args: str) -> Iterator[str]:
        """A detached container on the host's network, removed afterwards (its log is
        attached to a failure)."""
        self.run("rm", "-f", name, check=False)
        self.run("run", "-d", "--name", name, "--network", "host", *args, image)
        try:
            yield name
        finally:
            self.run("rm", "-f", "-t", "5", name, check=False, timeout=60)

    def logs(self, name: str) -> str:
        proc = self.run("logs", name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def running(self, name: str) -> bool:
        proc = self.run("inspect", "-f", "{{.State.Running}}", name, check=False)
        return proc.stdout.strip() == "true"


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


def host_pip_sources(workdir: Path) -> tuple[list[str], dict[str, str]]:
    """Build options that let pip inside a build step take packages where this
    machine's pip does: a pip.conf with the host's index, local wheel folders and CA
    bundle (a proxy that re-signs TLS needs it), each local path mounted read-only.
    Returns the `podman build` options and the build args."""
    env = os.environ
    ca = env.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    mounts: list[str] = []
    lines = ["[global]"]
    if Path(ca).is_file():
        mounts += ["-v", f"{ca}:/etc/ssl/certs/host-ca.crt:ro"]
        lines.append("cert = /etc/ssl/certs/host-ca.crt")
    index = env.get("PIP_INDEX_URL", "https://pypi.org/simple")
    lines.append(f"index-url = {index}")
    links = [
        p
        for value in (env.get("PIP_FIND_LINKS", ""), _pip_config("global.find-links"))
        for p in value.split()
        if Path(p).is_dir()
    ]
    extra = [
        u
        for value in (_pip_config("global.extra-index-url"), env.get("PIP_EXTRA_INDEX_URL", ""))
        for u in value.split()
        if not u.startswith("file://") or Path(urlparse(u).path).is_dir()
    ]
    if links:
        lines.append("find-links = " + " ".join(dict.fromkeys(links)))
    if extra:
        lines.append("extra-index-url = " + " ".join(dict.fromkeys(extra)))
    # A local index's pages link to files beside it (../../files/...): mount its parent.
    local = set(links) | {
        str(Path(urlparse(u).path).parent) for u in extra if u.startswith("file://")
    }
    for path in sorted(local):
        mounts += ["-v", f"{path}:{path}:ro"]
    conf = workdir / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    mounts += ["-v", f"{conf}:/etc/pip.conf:ro"]
    # torch 2.13.0 from the same sources: a local CPU wheel wins over PyPI's CUDA one
    # (2.13.0+cpu sorts above 2.13.0).
    return mounts, {"TORCH_INDEX_URL": index}


def _pip_config(key: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def build_args(args: dict[str, str]) -> Sequence[str]:
    return [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]


def wait_ready(podman: Podman, name: str, url: str, timeout: float = 300) -> float:
    """Seconds until `url` answers 200; fails early when the container exits."""
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not podman.running(name):
            pytest.fail(f"container {name} exited before ready:\n{podman.logs(name)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not ready after {timeout:.0f} s:\n{podman.logs(name)}")
