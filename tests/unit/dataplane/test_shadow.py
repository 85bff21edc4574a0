"""Shadow answers compared with the served ones."""

from __future__ import annotations

import numpy as np

from serving.dataplane.shadow import agreement


def test_shadow_agreement_uses_labels_when_present() -> None:
    a = {"label": np.array([0, 1, 1]), "probabilities": np.array([[0.9, 0.1]] * 3)}
    b = {"label": np.array([0, 1, 0]), "probabilities": np.array([[0.5, 0.5]] * 3)}
    assert agreement(a, b, ["label", "probabilities"]) == [True, True, False]
    c = {"y": np.array([1.0, 2.0])}
    d = {"y": np.array([1.00001, 2.5])}
    assert agreement(c, d, ["y"]) == [True, False]
