"""Demo models for the serving gateway: seeded training scripts and their builder."""
