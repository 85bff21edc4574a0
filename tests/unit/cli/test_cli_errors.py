"""CLI errors are one line naming the problem, with a non-zero exit: never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import serving.cli


def test_a_missing_instances_file_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "predict", "digits", "-i", "@no-such-file.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-file.json" in lines[0] and "cannot read" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_an_unexpected_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise RuntimeError("the problem\nand more detail")

    monkeypatch.setattr(serving.cli, "app", broken)
    with pytest.raises(SystemExit) as exited:
        serving.cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: RuntimeError: the problem\n"
