"""Digits demo model: a small CNN on sklearn's bundled 8x8 digits, trained once and
saved twice: v1 as TorchScript, v2 as a `torch.export` program (the same weights, so
the two formats give the same answers).

The module takes raw pixel values (0..16, as `load_digits` gives them) and normalizes
them itself, so clients send images exactly as they come.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from serving.models.registry import Batching, Manifest, Resources, TensorSpec, write_manifest
from serving.observability.drift import DriftReference, PredictionRef, RefHistogram

NAME = "digits"
# Version -> artifact: TorchScript, then the same model as an exported program.
ARTIFACTS = {"v1": "model.pt", "v2": "model.pt2"}
HELDOUT = "heldout.npz"
TEST_SIZE = 0.25
EPOCHS = 30
BATCH_SIZE = 32
THREADS = 2


class DigitsCNN(nn.Module):  # type: ignore[misc]  # torch is not type-checked here
    """image float32 [B, 8, 8] (0..16) -> (label int64 [B], probabilities float32 [B, 10])."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        # Normalization constants from the training set, stored with the weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def logits(self, image: Tensor) -> Tensor:
        x = ((image - self.mean) / self.std).unsqueeze(1)  # [B, 1, 8, 8]
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 32, 4, 4]
        return self.fc(self.dropout(x.flatten(1)))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        probabilities = torch.softmax(self.logits(image), dim=1)
        return probabilities.argmax(dim=1), probabilities


def _train(x: Tensor, y: Tensor, seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN(float(x.mean()), float(x.std()))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=order).split(BATCH_SIZE):
            opt.zero_grad()
            F.cross_entropy(model.logits(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def build(root: Path, seed: int = 7) -> None:
    """Train, verify and write `root/digits/{v1,v2}` and `root/digits/heldout.npz`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # small and reproducible on a laptop or CI runner
    try:
        _build(root, seed)
    finally:
        torch.set_num_threads(threads)


def save_torchscript(model: nn.Module, path: Path) -> Callable[[Tensor], Any]:
    """Write `model` as TorchScript; returns the file loaded back. TorchScript is still
    served, so torch 2.13's deprecation warnings about it are not shown here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))
        return torch.jit.load(str(path))  # type: ignore[no-any-return]


def save_exported(model: nn.Module, example: Tensor, path: Path) -> Callable[[Tensor], Any]:
    """Write `model` as an exported program whose batch axis is dynamic (the example
    needs a batch of 2 or more: torch specializes 0 and 1); returns it loaded back."""
    batch = torch.export.Dim("batch")
    # The example is saved with the program: a copy, not a view of a larger storage.
    program = torch.export.export(model, (example.clone(),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()  # type: ignore[no-any-return]


def _build(root: Path, seed: int) -> None:
    digits = load_digits()
    images: npt.NDArray[np.float32] = digits.images.astype(np.float32)
    labels: npt.NDArray[np.int64] = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=seed
    )
    model = _train(torch.from_numpy(x_train), torch.from_numpy(y_train), seed)
    x_test_t = torch.from_numpy(x_test)
    with torch.inference_mode():
        label, proba = model(x_test_t)
    # Reference for prediction drift: the predicted-class shares on training data.
    drift = DriftReference(
        prediction=PredictionRef(
            output="label",
            **RefHistogram.from_categories(_train_labels(model, x_train)).model_dump(),
        )
    )
    training: dict[str, str | int | float] = {
        "dataset": "sklearn.datasets.load_digits",
        "seed": seed,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "epochs": EPOCHS,
        "torch": torch.__version__,
    }
    for version, artifact in ARTIFACTS.items():
        folder = root / NAME / version
        folder.mkdir(parents=True, exist_ok=True)
        if artifact.endswith(".pt2"):
            loaded = save_exported(model, x_test_t[:BATCH_SIZE], folder / artifact)
        else:
            loaded = save_torchscript(model, folder / artifact)
        # The saved file must reproduce the in-memory model on the held-out set.
        with torch.inference_mode():
            loaded_label, loaded_proba = loaded(x_test_t)
        if loaded_label.dtype != torch.int64 or loaded_proba.dtype != torch.float32:
            raise RuntimeError(
                f"{version}: unexpected output dtypes {loaded_label.dtype}, {loaded_proba.dtype}"
            )
        if not torch.equal(label, loaded_label) or not torch.allclose(
            proba, loaded_proba, atol=1e-6
        ):
            raise RuntimeError(f"{version}: {artifact} does not reproduce the trained model")
        accuracy = float((loaded_label.numpy() == y_test).mean())
        assert accuracy >= 0.95, f"digits held-out accuracy {accuracy:.4f} < 0.95"
        write_manifest(folder, _manifest(version, artifact, accuracy, drift, training))
    np.savez_compressed(root / NAME / HELDOUT, X=x_test, y=y_test)


def _manifest(
    version: str,
    artifact: str,
    accuracy: float,
    drift: DriftReference,
    training: dict[str, str | int | float],
) -> Manifest:
    exported = artifact.endswith(".pt2")
    return Manifest(
        name=NAME,
        version=version,
        runtime="torch_export" if exported else "torchscript",
        artifact=artifact,
        description="Handwritten digit (8x8, pixel values 0..16) classifier: small CNN"
        + (" (v1's model as a torch.export program)." if exported else "."),
        inputs=[TensorSpec(name="image", dtype="float32", shape=[8, 8])],
        outputs=[
            TensorSpec(name="label", dtype="int64", shape=[]),
            TensorSpec(name="probabilities", dtype="float32", shape=[10]),
        ],
        batching=Batching(max_batch_size=32, batch_wait_timeout_s=0.002),
        resources=Resources(num_cpus=0.5),
        metrics={"accuracy": round(accuracy, 6)},
        drift=drift,
        training=training,
    )


def _train_labels(module: Callable[[Tensor], Any], x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        label, _ = module(torch.from_numpy(x))
    return np.asarray(label.numpy())
