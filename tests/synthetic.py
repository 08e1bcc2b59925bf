"""A small image task the tests generate: each class is a bright bar at its own place, under noise."""

from __future__ import annotations

import numpy as np
import torch

from noprop.data import LabelledData


def synthetic_arrays(n: int, num_classes: int = 4, size: int = 12, noise: float = 0.35,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, size, size] and int64 labels: class c lights up row band c (of num_classes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    x = rng.normal(0.3, noise, size=(n, size, size))
    band = size // num_classes
    for c in range(num_classes):
        x[y == c, c * band:(c + 1) * band, :] += 0.6
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64)


def synthetic_data(n: int, num_classes: int = 4, size: int = 12, seed: int = 0,
                   labels: np.ndarray | None = None) -> LabelledData:
    """The task as normalised LabelledData [n, 1, size, size]; labels can be overridden (shuffled-label tests)."""
    xs, ys = synthetic_arrays(n, num_classes, size, seed=seed)
    x = torch.from_numpy(xs).float().div(255).unsqueeze(1)
    mean, std = x.mean().item(), x.std().item()
    y = torch.from_numpy(ys if labels is None else labels)
    return LabelledData(x=(x - mean) / std, y=y, classes=[f"c{i}" for i in range(num_classes)],
                        mean=[mean], std=[std], name="synthetic")
