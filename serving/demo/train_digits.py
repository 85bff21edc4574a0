"""Digits demo model: a small CNN on sklearn's bundled 8x8 digits, exported as TorchScript.

The module takes raw pixel values (0..16, as `load_digits` gives them) and normalizes
them itself, so clients send images exactly as they come.
"""

from __future__ import annotations

from pathlib import Path

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
VERSIONS = ("v1",)
ARTIFACT = "model.pt"
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
    """Train, verify and write `root/digits/v1` and `root/digits/heldout.npz`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # small and reproducible on a laptop or CI runner
    try:
        _build(root, seed)
    finally:
        torch.set_num_threads(threads)


def _build(root: Path, seed: int) -> None:
    digits = load_digits()
    images: npt.NDArray[np.float32] = digits.images.astype(np.float32)
    labels: npt.NDArray[np.int64] = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=seed
    )
    model = _train(torch.from_numpy(x_train), torch.from_numpy(y_train), seed)

    folder = root / NAME / "v1"
    folder.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(folder / ARTIFACT))

    # The saved file must reproduce the in-memory model on the held-out set.
    x_test_t = torch.from_numpy(x_test)
    with torch.inference_mode():
        label, proba = model(x_test_t)
        loaded_label, loaded_proba = torch.jit.load(str(folder / ARTIFACT))(x_test_t)
    if loaded_label.dtype != torch.int64 or loaded_proba.dtype != torch.float32:
        raise RuntimeError(f"unexpected output dtypes {loaded_label.dtype}, {loaded_proba.dtype}")
    if not torch.equal(label, loaded_label) or not torch.allclose(proba, loaded_proba, atol=1e-6):
        raise RuntimeError("TorchScript file does not reproduce the trained model")

    accuracy = float((loaded_label.numpy() == y_test).mean())
    assert accuracy >= 0.95, f"digits held-out accuracy {accuracy:.4f} < 0.95"
    manifest = Manifest(
        name=NAME,
        version="v1",
        runtime="torchscript",
        artifact=ARTIFACT,
        description="Handwritten digit (8x8, pixel values 0..16) classifier: small CNN.",
        inputs=[TensorSpec(name="image", dtype="float32", shape=[8, 8])],
        outputs=[
            TensorSpec(name="label", dtype="int64", shape=[]),
            TensorSpec(name="probabilities", dtype="float32", shape=[10]),
        ],
        batching=Batching(max_batch_size=32, batch_wait_timeout_s=0.002),
        resources=Resources(num_cpus=0.5),
        metrics={"accuracy": round(accuracy, 6)},
        # Reference for prediction drift: the predicted-class shares on training data.
        drift=DriftReference(
            prediction=PredictionRef(
                output="label",
                **RefHistogram.from_categories(_train_labels(scripted, x_train)).model_dump(),
            )
        ),
        training={
            "dataset": "sklearn.datasets.load_digits",
            "seed": seed,
            "n_train": len(y_train),
            "n_test": len(y_test),
            "epochs": EPOCHS,
            "torch": torch.__version__,
        },
    )
    write_manifest(folder, manifest)
    np.savez_compressed(root / NAME / HELDOUT, X=x_test, y=y_test)


def _train_labels(module: torch.jit.ScriptModule, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        label, _ = module(torch.from_numpy(x))
    return np.asarray(label.numpy())
