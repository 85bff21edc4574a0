"""`python -m models.build [--force]`: the demo models into this folder (`make models`).
The builder itself is `serving.demo.build` (also `serving demo build DIR`, anywhere)."""

from __future__ import annotations

from pathlib import Path

from serving.demo.build import main

if __name__ == "__main__":
    main(default_root=Path(__file__).resolve().parent)
