#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU: the demo models on CUDA vs CPU, batched.
# Needs the project installed with a CUDA torch and the `gpu` extra (onnxruntime-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m models.build  # builds what is missing only
exec "$PY" -m loadtests.gpu_check "$@"
