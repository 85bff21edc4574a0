"""Build the demo models into a registry folder: `serving demo build DIR [--force]`
anywhere (the project's `make models`: `python -m models.build`, into `models/`).

A model is rebuilt only when one of its version folders lacks its manifest or artifact,
or its held-out set is missing; `--force` rebuilds everything. Builds are seeded, so a
rebuild reproduces the same metrics. Training needs the `train` extra.
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from serving.models.registry import MANIFEST, load_version

HELDOUT = "heldout.npz"
# The demo deployment, shipped in the package (the project keeps it as
# deployments/local.yaml; a test checks the two agree).
DEPLOYMENT_TEMPLATE = Path(__file__).with_name("deployment.yaml")


@dataclass(frozen=True)
class Demo:
    name: str
    artifacts: dict[str, str]  # version -> its artifact file
    module: str  # training module exposing build(root) and the same NAME and ARTIFACTS
    extra: tuple[str, ...] = ()  # other files the build writes under <root>/<name>/

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(self.artifacts)

    def build(self, root: Path) -> None:
        # Imported only when needed: the up-to-date check stays fast (no torch/sklearn).
        mod = importlib.import_module(self.module)
        if (self.name, self.artifacts) != (mod.NAME, mod.ARTIFACTS):
            raise RuntimeError(f"{self.module} does not match its entry in serving.demo.build")
        mod.build(root)


DEMOS = [
    Demo(
        "fraud",
        {"v1": "model.onnx", "v2": "model.onnx"},
        "serving.demo.train_fraud",
        ("features/user_stats.csv", "features/merchant_stats.csv"),
    ),
    Demo("digits", {"v1": "model.pt", "v2": "model.pt2"}, "serving.demo.train_digits"),
]


def is_built(root: Path, demo: Demo) -> bool:
    """Every version has its manifest and artifact, and the held-out set is there."""
    folder = root / demo.name
    return (
        (folder / HELDOUT).is_file()
        and all((folder / e).is_file() for e in demo.extra)
        and all(
            (folder / v / MANIFEST).is_file() and (folder / v / artifact).is_file()
            for v, artifact in demo.artifacts.items()
        )
    )


def build_all(root: Path, force: bool = False) -> None:
    """Every demo model into `root`, skipping those present (unless `force`)."""
    root = root.resolve()
    for demo in DEMOS:
        versions = "/".join(demo.versions)
        if not force and is_built(root, demo):
            print(f"[models] {demo.name} {versions} present in {root}, skipping", flush=True)
            continue
        print(f"[models] training {demo.name} {versions} ...", flush=True)
        start = time.perf_counter()
        demo.build(root)
        elapsed = time.perf_counter() - start
        for v in demo.versions:
            metrics = load_version(root / demo.name / v).manifest.metrics
            shown = " ".join(f"{k}={val:.4f}" for k, val in metrics.items())
            print(f"[models]   {demo.name} {v}: {shown}", flush=True)
        print(f"[models] built {demo.name} in {elapsed:.1f}s", flush=True)


def write_deployment(root: Path) -> Path:
    """`<root>/deployment.yaml`: the packaged demo deployment (the project's
    deployments/local.yaml) with the registry and feature tables in `root`, so that
    `serving up --config <root>/deployment.yaml` serves the demo from anywhere."""
    root = root.resolve()
    doc = yaml.safe_load(DEPLOYMENT_TEMPLATE.read_text())
    doc["registry"] = str(root)
    for table in doc.get("feature_tables", []):
        table["path"] = str(root / Path(table["path"]).relative_to("models"))
    out = root / "deployment.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def main(argv: list[str] | None = None, default_root: Path | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument(
        "--root",
        type=Path,
        default=default_root,
        required=default_root is None,
        help="registry folder to write into (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    build_all(args.root, args.force)


if __name__ == "__main__":
    main()
