"""The Dockerfiles pass hadolint and keep the rules the images are built by: base pinned
by digest (overridable), multi-stage, exactly one ONNX Runtime extra each, a numeric
user, a health check, and a build context of the copied sources only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILES = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", *DOCKERFILES],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(("name", "extra"), DOCKERFILES.items())
def test_the_rules_of_each_image(name: str, extra: str) -> None:
    text = (ROOT / name).read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and re.search(r"@sha256:[0-9a-f]{64}$", base.group(1)), "base pinned by digest"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 4  # deps, app, models, runtime
    assert f'["optional-dependencies"]["{extra}"]' in text
    other = {"cpu": "gpu", "gpu": "cpu"}[extra]
    assert f'["optional-dependencies"]["{other}"]' not in text
    assert re.search(r"^USER \d+:\d+$", text, re.M), "a numeric user"
    assert 'CMD ["serving", "health"]' in text
    # The dependency layer is built before any source is copied.
    assert text.index("pip install -c constraints.txt -r requirements.txt") < text.index(
        "COPY serving"
    )


def test_the_build_context_is_what_the_dockerfiles_copy() -> None:
    """.dockerignore excludes everything (host-built .venv and models, results, .git)
    but the sources the Dockerfiles COPY."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for name in DOCKERFILES:
        for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / name).read_text(), re.M):
            copied |= set(sources.split())
    assert included == copied
