"""Canary rollouts: routing tables (`table`: pure choice of a version; `tables`: every
model's table in memory, kept current from Redis: the data plane's Router), per-arm
statistics (`stats`), the rollout spec, state and analysis (`analysis`), and the
controller that runs commands and the analysis loop (`controller`)."""
