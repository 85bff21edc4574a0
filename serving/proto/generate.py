"""Regenerate the Python modules of `grpc_predict_v2.proto` (committed to the repo):

    python -m serving.proto.generate

Needs grpcio-tools (the `dev` extra). Two edits follow protoc, both needed:
- the messages are built in a private descriptor pool, not protobuf's default one:
  tritonclient and other OIP clients register their own `inference.*` messages in the
  default pool, and two files defining the same symbols cannot share it, so a process
  could not import both;
- the service module imports the messages package-relative
  (`from serving.proto import grpc_predict_v2_pb2`).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
STEM = "grpc_predict_v2"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path.name}: expected {old!r} in protoc's output; check the edit")
    path.write_text(text.replace(old, new))


def main() -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={HERE}",
            f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}",
            str(HERE / PROTO),
        ],
        check=True,
    )
    protoc = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    pb2 = HERE / f"{STEM}_pb2.py"
    _edit(
        pb2,
        "_descriptor_pool.Default().AddSerializedFile(",
        "_descriptor_pool.DescriptorPool().AddSerializedFile(",
    )
    _edit(
        HERE / f"{STEM}_pb2_grpc.py",
        f"import {STEM}_pb2 as",
        f"from serving.proto import {STEM}_pb2 as",
    )
    header = (
        f"# Generated from {PROTO} by serving/proto/generate.py with grpcio-tools "
        f"{version('grpcio-tools')} ({protoc}); do not edit.\n"
    )
    for name in (f"{STEM}_pb2.py", f"{STEM}_pb2.pyi", f"{STEM}_pb2_grpc.py"):
        path = HERE / name
        path.write_text(header + path.read_text())
    print(f"generated {STEM}_pb2.py, {STEM}_pb2.pyi, {STEM}_pb2_grpc.py with {header[2:].strip()}")


if __name__ == "__main__":
    main()
