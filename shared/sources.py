"""The dataset catalogue, the data root and DatasetError: what every data module (and CLI) shares.

Every user-facing failure is a :class:`DatasetError` whose one-line message names the path or name and
the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATASETS", "SPLITS", "DatasetError", "default_data_root"]


class DatasetError(Exception):
    """One-line, user-facing: names the path/name and the fix."""


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

# name -> (torchvision class name, folder under root that holds it)
_TORCHVISION = {
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "mnist": ("MNIST", "MNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
}
_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def default_data_root() -> Path:
    """``$NOPROP_DATA`` if set, else ``./data``: one place for every command to look."""
    env = os.environ.get("NOPROP_DATA", "").strip()
    return Path(env).expanduser() if env else Path("data")


def _root(root: Path | str | None) -> Path:
    """``root`` as a path, or :func:`default_data_root` when none is given."""
    return Path(root).expanduser() if root is not None else default_data_root()


def _one_line(exc: object) -> str:
    """An exception's text on one line (every DatasetError message is one line)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _builtin_key(name: str) -> str | None:
    """The :data:`DATASETS` key a user's spelling names (``FashionMNIST``, ``cifar-10``, ...), else None."""
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    return key if key in DATASETS else None
