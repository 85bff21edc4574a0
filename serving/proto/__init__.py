"""Generated Open Inference Protocol gRPC modules (see generate.py)."""
