"""The demo models: seeded training scripts, their builder and the demo deployment."""
