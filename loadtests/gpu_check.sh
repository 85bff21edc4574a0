#!/usr/bin/env bash
# Run on a machine with an NVIDIA GPU: both demo models on CUDA vs CPU, batched.
# Needs the project installed with a CUDA torch and the `gpu` extra (onnxruntime-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -f models/fraud/v2/model.yaml ] || "$PY" -m models.build
exec "$PY" -m loadtests.gpu_check "$@"
