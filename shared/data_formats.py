"""Format readers: one split of a built-in, .npz or image-folder source as raw tensors, not yet normalised.

Used by :func:`noprop.data.load_dataset`. A source without its own test split gets a seeded, class-stratified
holdout (:data:`HOLDOUT_FRACTION` of each class, seed :data:`HOLDOUT_SEED`) as its test split.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noprop.fetch import _torchvision_dataset
from noprop.sources import _PRETTY, _TORCHVISION, SPLITS, DatasetError, _one_line

# Fraction of a source without its own test split that is held out as the test split, and the fixed seed
# of that holdout: it does not depend on a run's seed, so train and test never overlap across runs.
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

_GRAYSCALE_MODES = ("1", "L", "LA")


@dataclass
class _Raw:
    """One split before normalisation: x float32 (images in [0, 1]), y int64."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


def _load_builtin(key: str, split: str, root: Path, download: bool) -> _Raw:
    """Read ds.data / ds.targets straight into tensors (no per-sample __getitem__)."""
    ds = _torchvision_dataset(key, split, root, download)
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # MNIST-style [N, H, W]
        data = data.unsqueeze(1)
    elif data.ndim == 4:  # CIFAR [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    x = data.contiguous().to(torch.float32).div_(255.0)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    folder = root / _TORCHVISION[key][1]
    if x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"{_PRETTY[key]} {split} split under {folder} has {x.shape[0]} images but {y.shape[0]} labels: "
            f"the files are corrupt, delete them and fetch again"
        )
    return _Raw(x=x, y=y, classes=[str(c) for c in ds.classes])


def _holdout(
    y: np.ndarray, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified, seeded train/test split: per class round(fraction * n) examples go to test, but
    each class keeps at least one training example."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = min(int(math.floor(idx.size * fraction + 0.5)), idx.size - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _check_labels(y: np.ndarray, num_classes: int | None, where: str) -> np.ndarray:
    """Labels must be integers in [0, num_classes); returns them as int64 [N]."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(
            f"{where}: labels must have shape [N], got {list(y.shape)} (one-hot? use y.argmax(1))"
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{where}: labels must be integers 0..K-1, found non-integer values")
    elif y.dtype.kind not in "iub":
        raise DatasetError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DatasetError(f"{where}: labels must be integers 0..K-1, found {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise DatasetError(
            f"{where}: label {int(y.max())} is out of range for {num_classes} classes (fix the labels or the "
            f"`classes` array)"
        )
    return y


def _npz_images(x: np.ndarray, where: str) -> torch.Tensor:
    """Array -> float32 tensor [N, C, H, W] or [N, F]; uint8 scaled to [0, 1], floats kept."""
    if x.dtype.kind not in "uifb":
        raise DatasetError(f"{where}: x must be numeric, got dtype {x.dtype}")
    if x.ndim == 2:
        pass  # tabular [N, F]
    elif x.ndim == 3:
        x = x[:, None, :, :]  # [N, H, W] -> one channel
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[-1] < x.shape[1]:
            x = np.transpose(x, (0, 3, 1, 2))  # channels-last
    else:
        raise DatasetError(
            f"{where}: x must be [N, F], [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {list(x.shape)}"
        )
    t = torch.from_numpy(np.ascontiguousarray(x))
    scaled = t.to(torch.float32).div_(255.0) if x.dtype == np.uint8 else t.to(torch.float32)
    if scaled.dtype.is_floating_point and not torch.isfinite(scaled).all():
        raise DatasetError(f"{where}: x contains NaN or infinite values; clean the data")
    return scaled.contiguous()


def _load_npz(path: Path, split: str) -> _Raw:
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not an .npz file: give the .npz file, or imagefolder:{path} for a "
                           "folder of class subfolders")
    if not path.is_file():
        raise DatasetError(f"npz file not found: {path} (give an existing .npz path, e.g. npz:data/mine.npz)")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path} is not a .npz (zip) archive: write it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        raise DatasetError(
            f"{path}: cannot read without pickle ({_one_line(exc)}); save plain numeric arrays and `classes` "
            f"as a string array (np.array(names))"
        ) from exc
    except Exception as exc:  # zipfile.BadZipFile, OSError, ...
        raise DatasetError(f"{path} is not a readable .npz ({_one_line(exc)}): use np.savez") from exc
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = {s: (arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in SPLITS}
    elif {"x", "y"} <= arrays.keys():
        parts = {"all": (arrays["x"], arrays["y"])}
    else:
        raise DatasetError(
            f"{path}: needs arrays x_train, y_train, x_test, y_test (or x, y for a 20% holdout); "
            f"found {sorted(arrays) or 'none'}"
        )
    classes: list[str] | None = None
    if "classes" in arrays:
        c = arrays["classes"]
        if c.ndim != 1 or c.size == 0:
            raise DatasetError(f"{path}: `classes` must be a non-empty 1-D array of names")
        classes = [str(v) for v in c.tolist()]
    for key, (x, y) in parts.items():
        where = f"{path} [{key}]"
        if x.ndim < 2:
            raise DatasetError(f"{where}: x must have 2 to 4 dimensions [N, ...], got shape {list(x.shape)}")
        n_labels = np.shape(y)[0] if np.ndim(y) else 0
        if x.shape[0] != n_labels:
            raise DatasetError(f"{where}: x has {x.shape[0]} rows but y has {n_labels} labels: fix y")
        if x.shape[0] == 0:
            raise DatasetError(f"{where}: empty dataset (0 examples)")
    if "all" not in parts and parts["train"][0].shape[1:] != parts["test"][0].shape[1:]:
        raise DatasetError(
            f"{path}: x_train examples are {list(parts['train'][0].shape[1:])} but x_test examples are "
            f"{list(parts['test'][0].shape[1:])}: make them match"
        )
    labels = {k: _check_labels(np.asarray(y), len(classes) if classes else None, f"{path} [{k}]")
              for k, (_, y) in parts.items()}
    if classes is None:
        classes = [str(i) for i in range(int(max(int(v.max()) for v in labels.values())) + 1)]
    if "all" in parts:
        x_all, y_all = parts["all"][0], labels["all"]
        tr, te = _holdout(y_all)
        if te.size == 0:
            raise DatasetError(f"{path}: too few rows ({y_all.size}) for a 20% holdout: add x_test/y_test")
        sel = tr if split == "train" else te
        x, y = x_all[sel], y_all[sel]
    else:
        x, y = parts[split][0], labels[split]
    return _Raw(x=_npz_images(x, f"{path} [{split}]"), y=torch.from_numpy(y), classes=classes)


def _scan_images(samples: list[tuple[str, int]], where: Path) -> bool:
    """Check from the headers alone (no decode) that every image of the source opens and shares one size;
    return True when all are grayscale (then they are kept as one channel)."""
    from PIL import Image, UnidentifiedImageError

    first: tuple[str, tuple[int, int]] | None = None
    gray = True
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image {path} ({_one_line(exc)}): fix or remove it") from exc
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise DatasetError(
                f"{path} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}: all images "
                f"under {where} must share one size (resize them first)"
            )
        gray = gray and mode in _GRAYSCALE_MODES
    return gray


def _decode_images(samples: list[tuple[str, int]], gray: bool) -> torch.Tensor:
    """Decode once into [N, C, H, W] float32 in [0, 1]."""
    from PIL import Image

    mode = "L" if gray else "RGB"
    arrays = []
    for path, _ in samples:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
        except OSError as exc:  # truncated file that passed the header scan
            raise DatasetError(f"cannot decode image {path} ({_one_line(exc)}): fix or remove it") from exc
    arr = np.stack(arrays)
    arr = arr[:, None] if gray else arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)


def _load_imagefolder(path: Path, split: str) -> _Raw:
    """``PATH/train`` (+ ``PATH/test`` if present) or the whole folder with a 20% holdout as the test split.
    Size and grayscale are decided over every image of the source, so both splits always agree."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not path.is_dir():
        raise DatasetError(f"image folder not found: {path} (give a folder of class subfolders)")
    has_split = (path / "train").is_dir()
    train_dir = path / "train" if has_split else path
    try:
        train = ImageFolder(str(train_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(
            f"{train_dir}: {_one_line(exc)} (expected one subfolder per class holding images)"
        ) from exc
    classes, class_to_idx = train.classes, train.class_to_idx
    test_dir = path / "test"
    if has_split and test_dir.is_dir():
        try:
            test_classes, _ = find_classes(str(test_dir))
        except FileNotFoundError as exc:
            raise DatasetError(f"{test_dir}: {_one_line(exc)} (expected one subfolder per class)") from exc
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DatasetError(f"{test_dir} has classes not in {train_dir}: {', '.join(unknown)}")
        test_samples = make_dataset(str(test_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        splits = {"train": list(train.samples), "test": list(test_samples)}
    else:
        y_all = np.array([t for _, t in train.samples], dtype=np.int64)
        tr, te = _holdout(y_all)
        splits = {"train": [train.samples[i] for i in tr], "test": [train.samples[i] for i in te]}
    samples = splits[split]
    if not samples:
        fix = f"add images to {test_dir}" if has_split else f"add images, or a {path}/test folder"
        raise DatasetError(f"{path}: the {split} split is empty (no images): {fix}")
    gray = _scan_images(splits["train"] + splits["test"], path)
    x = _decode_images(samples, gray)
    y = torch.tensor([t for _, t in samples], dtype=torch.long)
    return _Raw(x=x, y=y, classes=list(classes))
