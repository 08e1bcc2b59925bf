"""Datasets and partitioners for noprop-fl.

Every dataset is loaded once into memory as tensors (:class:`LabelledData`): all the datasets we support
fit, and it makes batching many blocks over many epochs cheap (no per-sample decode or collate).

Sources (the ``name`` of :func:`load_dataset`):

- ``fashion-mnist`` (the default, real data), ``mnist``, ``cifar10``, ``cifar100``: read through
  torchvision's dataset classes from a local folder (``root``). Fashion-MNIST is fetched by
  :func:`fetch_fashion_mnist` (system copy, Debian package via ``apt-get download``, then torchvision's
  downloader); the others by torchvision's downloader when ``download=True``.
- ``imagefolder:PATH``: a torchvision ImageFolder tree (``PATH/train`` and ``PATH/test`` if present).
- ``npz:PATH``: an ``.npz`` of arrays (``x_train, y_train, x_test, y_test`` or ``x, y``).
- A bare ``PATH``: an existing folder is read as ``imagefolder:PATH``, a file (or a name ending in .npz) as
  ``npz:PATH``.

Normalisation: ``mean`` and ``std`` hold one entry per entry of dimension 1 of ``x`` -- per channel for
images (``[N, C, H, W]``), per feature for tabular data (``[N, F]``) -- computed on the *full* train split
of the source (population std; a constant channel gets std 1 so it is not divided by zero). The test split
always uses the train split's statistics: pass ``normalise_with=train``, or leave it ``None`` and the train
split of the same source is read to compute them. Raw image values are in ``[0, 1]`` (uint8 / 255) before
normalisation, so an exported model can state its input normalisation as those two lists.

Every user-facing failure is a :class:`DatasetError` whose one-line message names the path or name and
the fix.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

__all__ = [
    "DATASETS",
    "DatasetError",
    "LabelledData",
    "class_partition",
    "default_data_root",
    "dirichlet_partition",
    "fetch_dataset",
    "fetch_fashion_mnist",
    "iid_partition",
    "load_dataset",
    "load_train_test",
    "parse_partitioning",
    "partition",
]


class DatasetError(Exception):
    """One-line, user-facing: names the path/name and the fix."""


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

# Fraction of a source without its own test split that is held out as the test split, and the fixed seed
# of that holdout: it does not depend on a run's seed, so train and test never overlap across runs.
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0

# Where fetch_fashion_mnist looks and what it runs. Module-level so tests (and unusual systems) can
# point them elsewhere.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
APT_GET = "apt-get"
DPKG_DEB = "dpkg-deb"
APT_TIMEOUT_S = 600.0
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}

# The four IDX files torchvision's MNIST-style classes read from ROOT/<ClassName>/raw/.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# name -> (torchvision class name, folder under root that holds it)
_TORCHVISION = {
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "mnist": ("MNIST", "MNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
}
_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_GRAYSCALE_MODES = ("1", "L", "LA")
_STATS_CHUNK = 8192


@dataclass
class LabelledData:
    """A dataset held in memory as tensors: small enough for all datasets we support, and it makes
    batching 10 blocks x N epochs cheap (no per-sample PIL decode)."""

    x: torch.Tensor  # float32, normalised: [N, C, H, W] for images, [N, F] for tabular
    y: torch.Tensor  # int64 [N]
    classes: list[str]
    mean: list[float]  # one per entry of x.shape[1] (channel, or feature for tabular), on raw values
    std: list[float]
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (what a model's first layer sees)."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes of the source, including any absent from this split or subset."""
        return len(self.classes)

    def describe(self) -> dict:
        """What a checkpoint records of its data: name, class names, normalisation, input shape."""
        return {"name": self.name, "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "input_shape": list(self.input_shape)}

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> LabelledData:
        """The examples at ``indices``, keeping classes and normalisation (partitions and quick runs)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        return LabelledData(
            x=self.x[idx],
            y=self.y[idx],
            classes=list(self.classes),
            mean=list(self.mean),
            std=list(self.std),
            name=self.name,
        )

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over ``(x, y)`` batches. Each step indexes the tensors with a whole batch of indices at
        once (a BatchSampler as the sampler, ``batch_size=None``), so there is no per-sample collate."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dataset = TensorDataset(self.x, self.y)
        base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        loader = DataLoader(
            dataset, sampler=BatchSampler(base, batch_size=batch_size, drop_last=drop_last), batch_size=None
        )
        return iter(loader)


# ----------------------------------------------------------------------------------------------------------
# Roots and fetching


def default_data_root() -> Path:
    """``$NOPROP_DATA`` if set, else ``./data``: one place for every command to look."""
    env = os.environ.get("NOPROP_DATA", "").strip()
    return Path(env).expanduser() if env else Path("data")


def _root(root: Path | str | None) -> Path:
    return Path(root).expanduser() if root is not None else default_data_root()


def _idx_present(raw: Path) -> bool:
    """True when each of the four IDX files is there, extracted or gzipped."""
    return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in IDX_FILES)


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress (or copy, if not gzipped) ``src`` to ``dst`` atomically."""
    tmp = dst.with_name(dst.name + ".part")
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)
    os.replace(tmp, dst)


def _extract_in_place(raw: Path) -> list[str]:
    """Extract ``X.gz`` to ``X`` where only the gzipped file is there (torchvision reads plain files)."""
    done = []
    for f in IDX_FILES:
        if not (raw / f).is_file() and (raw / f"{f}.gz").is_file():
            try:
                _gunzip(raw / f"{f}.gz", raw / f)
            except (OSError, EOFError, zlib.error) as exc:
                raise DatasetError(
                    f"cannot extract {raw / f}.gz ({_one_line(exc)}): replace the file or re-fetch it"
                ) from exc
            done.append(f)
    return done


def _install_idx(src: Path, raw: Path) -> None:
    """Copy the four IDX files (gzipped or not) from ``src`` into ``raw``, extracted."""
    raw.mkdir(parents=True, exist_ok=True)
    for f in IDX_FILES:
        source = src / f"{f}.gz" if (src / f"{f}.gz").is_file() else src / f
        _gunzip(source, raw / f)


def _remove_idx(raw: Path) -> None:
    """Remove extracted IDX files a failed step left, so the next step (torchvision) does not trust them."""
    for f in IDX_FILES:
        (raw / f).unlink(missing_ok=True)


def _verify_fashion_mnist(root: Path) -> None:
    """Load both splits through torchvision and check their sizes."""
    from torchvision.datasets import FashionMNIST

    for split, expected in FASHION_MNIST_SIZES.items():
        try:
            n = len(FashionMNIST(str(root), train=split == "train").targets)
        except Exception as exc:  # torchvision raises assertion/runtime/value errors on bad files
            raise DatasetError(f"Fashion-MNIST under {root} does not load: {_one_line(exc)}") from exc
        if n != expected:
            raise DatasetError(
                f"Fashion-MNIST {split} split under {root} has {n} examples, expected {expected}"
            )


def _fetch_from_system(root: Path, raw: Path, log: Callable[[str], None]) -> bool:
    """Step 2: copy from the folder the Debian package installs, if it is there."""
    src = SYSTEM_FASHION_MNIST_DIR
    if not _idx_present(src):
        log(f"no system copy at {src} (Debian package {DEBIAN_PACKAGE} not installed)")
        return False
    _install_idx(src, raw)
    log(f"copied Fashion-MNIST from the system folder {src}")
    return True


def _fetch_from_apt(root: Path, raw: Path, log: Callable[[str], None]) -> bool:
    """Step 3: ``apt-get download`` the Debian package and unpack it with ``dpkg-deb -x`` (no root)."""
    if shutil.which(APT_GET) is None or shutil.which(DPKG_DEB) is None:
        log(f"{APT_GET}/{DPKG_DEB} not available: skipping the Debian package {DEBIAN_PACKAGE}")
        return False
    with tempfile.TemporaryDirectory(prefix="noprop-fmnist-") as tmp:
        tmpdir = Path(tmp)
        try:
            subprocess.run(
                [APT_GET, "download", DEBIAN_PACKAGE],
                cwd=tmpdir, check=True, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
            )
            debs = sorted(tmpdir.glob("*.deb"))
            if not debs:
                raise RuntimeError("no .deb file was downloaded")
            subprocess.run(
                [DPKG_DEB, "-x", str(debs[0]), str(tmpdir / "x")],
                check=True, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
            )
        except subprocess.CalledProcessError as exc:
            why = _one_line(exc.stderr or exc.stdout or exc) or f"exit status {exc.returncode}"
            log(f"`{' '.join(map(str, exc.cmd))}` failed: {why}")
            return False
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"`{APT_GET} download {DEBIAN_PACKAGE}` failed: {_one_line(exc)}")
            return False
        src = tmpdir / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
        if not _idx_present(src):
            inside = src.relative_to(tmpdir / "x")
            log(f"the Debian package {debs[0].name} does not hold the IDX files under /{inside}")
            return False
        _install_idx(src, raw)
        log(f"unpacked Fashion-MNIST from the Debian package {debs[0].name} (apt-get download + dpkg-deb -x)")
    return True


def _fetch_from_torchvision(root: Path, raw: Path, log: Callable[[str], None]) -> bool:
    """Step 4: torchvision's own downloader (needs internet access to its mirrors)."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # network errors come as URLError, RuntimeError, OSError...
        log(f"torchvision's downloader failed: {_one_line(exc)}")
        return False
    log(f"downloaded Fashion-MNIST with torchvision into {raw}")
    return True


def fetch_fashion_mnist(root: Path | str | None = None, log: Callable[[str], None] = print) -> Path:
    """Put Fashion-MNIST where ``torchvision.datasets.FashionMNIST(root)`` finds it and return that folder
    (``root/FashionMNIST/raw``).

    Tries, in order, logging one line per step: (1) already there (gzipped-only files are extracted);
    (2) the system folder the Debian package installs; (3) ``apt-get download`` of that package and
    ``dpkg-deb -x`` into a temporary folder (no root needed); (4) torchvision's downloader. The result of
    steps 2-4 is verified by loading it (60000/10000 examples); a step whose result does not load is undone
    and the next one is tried. If all fail: :class:`DatasetError` with the fix.
    """
    root = _root(root)
    raw = root / "FashionMNIST" / "raw"
    if _idx_present(raw):
        extracted = _extract_in_place(raw)
        if extracted:
            log(f"Fashion-MNIST already in {raw}; extracted {', '.join(f + '.gz' for f in extracted)}")
        else:
            log(f"Fashion-MNIST already present in {raw}; nothing to do")
        return raw
    steps = (
        ("the system folder", _fetch_from_system),
        ("the Debian package", _fetch_from_apt),
        ("torchvision's downloader", _fetch_from_torchvision),
    )
    for label, step in steps:
        try:
            if not step(root, raw, log):
                continue
            _verify_fashion_mnist(root)
            return raw
        except DatasetError as exc:
            log(f"{exc}; trying the next source")
        except (OSError, EOFError, zlib.error) as exc:  # e.g. root not writable, truncated archive
            log(f"fetching from {label} failed: {_one_line(exc)}")
        _remove_idx(raw)  # never leave files that would make the next step (or a later run) trust them
    raise DatasetError(
        f"could not fetch Fashion-MNIST into {raw}: install the Debian package {DEBIAN_PACKAGE} "
        f"(`apt-get install {DEBIAN_PACKAGE}`) or copy the four IDX files ({', '.join(IDX_FILES)}, "
        f"gzipped or not) into {raw}, then run `noprop-data fetch fashion-mnist --root {root}` again"
    )


def fetch_dataset(name: str, root: Path | str | None = None, log: Callable[[str], None] = print) -> Path:
    """Fetch a built-in dataset: Fashion-MNIST through :func:`fetch_fashion_mnist`, the others with
    torchvision's downloader (needs internet). Returns the folder that holds the files."""
    key = _builtin_key(name)
    if key is None:
        raise DatasetError(f"cannot fetch {name!r}: fetch knows {', '.join(DATASETS)}")
    if key == "fashion-mnist":
        return fetch_fashion_mnist(root, log=log)
    root = _root(root)
    folder = root / _TORCHVISION[key][1]
    for split in SPLITS:
        _torchvision_dataset(key, split, root, download=True)
    log(f"{_PRETTY[key]} present and readable in {folder} (torchvision)")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Raw:
    """One split before normalisation: x float32 (images in [0, 1]), y int64."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]


def _one_line(exc: object) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _builtin_key(name: str) -> str | None:
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    return key if key in DATASETS else None


def _valid_names() -> str:
    return ", ".join(DATASETS) + ", imagefolder:PATH, npz:PATH"


def _torchvision_dataset(key: str, split: str, root: Path, download: bool):  # noqa: ANN202 - torchvision type
    """Instantiate the torchvision dataset, turning its exceptions into one-line DatasetErrors."""
    import torchvision.datasets as tvd

    cls_name, sub = _TORCHVISION[key]
    pretty = _PRETTY[key]
    folder = root / sub
    mnist_like = key in ("fashion-mnist", "mnist")
    present = _idx_present(folder) if mnist_like else folder.is_dir()
    if not present and not download:
        if key == "fashion-mnist":
            fix = f"run `noprop-data fetch fashion-mnist --root {root}`"
        else:
            fix = f"put it there or pass --download (`noprop-data fetch {key} --root {root}`)"
        raise DatasetError(f"{pretty} not found under {folder}: {fix}")
    if key == "fashion-mnist" and download and not present:
        fetch_fashion_mnist(root, log=lambda m: print(m, file=sys.stderr))
        download, present = False, True
    if mnist_like and folder.is_dir():
        _extract_in_place(folder)
    try:
        return getattr(tvd, cls_name)(str(root), train=split == "train", download=download)
    except Exception as exc:  # torchvision: AssertionError/RuntimeError/ValueError/URLError...
        if download and not present:
            raise DatasetError(
                f"could not download {pretty} into {folder} ({_one_line(exc)}): check the network, or put "
                f"the files there yourself"
            ) from exc
        raise DatasetError(
            f"{pretty} under {folder} is corrupt or incomplete ({_one_line(exc)}): delete the folder and "
            f"fetch it again (`noprop-data fetch {key} --root {root}`)"
        ) from exc


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


def _parse_name(name: str) -> tuple[str, Path | None]:
    """-> (kind, path): kind is a DATASETS key, 'imagefolder' or 'npz'."""
    for prefix in ("imagefolder:", "npz:"):
        if name.lower().startswith(prefix):
            rest = name[len(prefix):].strip()
            if not rest:
                raise DatasetError(f"dataset {name!r} needs a path after the colon, e.g. {prefix}data/mine")
            return prefix[:-1], Path(rest).expanduser()
    key = _builtin_key(name)
    if key is not None:
        return key, None
    path = Path(name.strip()).expanduser()  # a bare path: the kind follows from what is there
    if path.is_dir():
        return "imagefolder", path
    if path.suffix.lower() == ".npz" or path.is_file():
        return "npz", path
    raise DatasetError(f"unknown dataset {name!r}: choose one of {_valid_names()}, or the path of an existing "
                       ".npz file or image folder")


def _load_raw(name: str, split: str, root: Path | str | None, download: bool) -> _Raw:
    kind, path = _parse_name(name)
    if kind == "npz":
        raw = _load_npz(path, split)
    elif kind == "imagefolder":
        raw = _load_imagefolder(path, split)
    else:
        raw = _load_builtin(kind, split, _root(root), download)
    if raw.x.shape[0] == 0:
        raise DatasetError(f"dataset {name!r} ({split}) is empty: add examples")
    if raw.y.numel() and (int(raw.y.min()) < 0 or int(raw.y.max()) >= len(raw.classes)):
        raise DatasetError(
            f"dataset {name!r} ({split}) has labels outside 0..{len(raw.classes) - 1}: fix the labels"
        )
    return raw


def _channel_view(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.ndim - 2)))


def _stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-entry-of-dim-1 mean and population std: float32 work over row chunks (bounded memory),
    float64 accumulation."""
    dims = [0, *range(2, x.ndim)]
    count = x.shape[0] * math.prod(x.shape[2:])
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(_STATS_CHUNK):
        total += chunk.sum(dim=dims, dtype=torch.float64)
    mean = total / count
    centre = mean.to(torch.float32)
    sq = torch.zeros_like(total)
    for chunk in x.split(_STATS_CHUNK):
        sq += (chunk - _channel_view(chunk, centre)).square_().sum(dim=dims, dtype=torch.float64)
    var = sq / count - (centre.to(torch.float64) - mean).square()  # centred on the float32-rounded mean
    std = var.clamp_min(0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant channel: do not divide by 0
    return mean.tolist(), std.tolist()


def load_dataset(
    name: str,
    split: str = "train",
    root: Path | str | None = None,
    download: bool = False,
    normalise_with: LabelledData | None = None,
) -> LabelledData:
    """Load one split of a dataset into memory, normalised.

    ``name``: one of :data:`DATASETS`, ``imagefolder:PATH`` or ``npz:PATH`` (see the module docstring).
    Sources without their own test split get a seeded, class-stratified 20% holdout as the test split
    (fixed seed :data:`HOLDOUT_SEED`, independent of a run's seed). Statistics come from the train split;
    for ``split="test"`` pass ``normalise_with=train_data``, else the train split is read to compute them.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'test'")
    raw = _load_raw(name, split, root, download)
    x = raw.x
    if split == "train":
        mean, std = _stats(x)
    elif normalise_with is not None:
        if normalise_with.input_shape != tuple(x.shape[1:]) or len(normalise_with.mean) != x.shape[1]:
            raise DatasetError(
                f"dataset {name!r}: test examples are {list(x.shape[1:])} but normalise_with "
                f"({normalise_with.name}) has {list(normalise_with.input_shape)}: pass this dataset's train"
            )
        if list(normalise_with.classes) != list(raw.classes):
            raise DatasetError(
                f"dataset {name!r}: classes differ from normalise_with ({normalise_with.name}): pass this "
                f"dataset's train split"
            )
        mean, std = list(normalise_with.mean), list(normalise_with.std)
    else:
        mean, std = _stats(_load_raw(name, "train", root, download).x)
    x.sub_(_channel_view(x, torch.tensor(mean, dtype=torch.float32)))
    x.div_(_channel_view(x, torch.tensor(std, dtype=torch.float32)))
    kind, _ = _parse_name(name)
    label = name.strip() if kind in ("npz", "imagefolder") else kind
    return LabelledData(x=x, y=raw.y, classes=list(raw.classes), mean=mean, std=std, name=label)


def _stratified_subset(y: np.ndarray, m: int, seed: int) -> np.ndarray:
    """``m`` indices, per class in proportion to its size (largest remainder), at least one per present
    class when ``m`` allows; seeded."""
    rng = np.random.default_rng(seed)
    present, counts = np.unique(y, return_counts=True)
    quota = m * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: m - int(take.sum())]] += 1
    if m >= present.size:
        for i in np.flatnonzero(take == 0):
            donor = int(np.argmax(take - quota))  # the class most over its proportional share
            take[donor] -= 1
            take[i] += 1
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(k), replace=False)
        for c, k in zip(present, take, strict=True)
        if k
    ]
    return np.sort(np.concatenate(chosen))


def load_train_test(
    name: str,
    root: Path | str | None = None,
    download: bool = False,
    subset: int | None = None,
    seed: int = 0,
) -> tuple[LabelledData, LabelledData]:
    """Train and test splits, the test normalised with the train statistics. ``subset``: a seeded,
    class-stratified subset of that many train examples for quick runs (statistics still from the full
    train split, test untouched)."""
    train = load_dataset(name, "train", root=root, download=download)
    test = load_dataset(name, "test", root=root, download=download, normalise_with=train)
    if subset is not None:
        if subset < 1:
            raise DatasetError(f"--subset must be >= 1, got {subset}")
        if subset < len(train):
            train = train.subset(_stratified_subset(train.y.numpy(), subset, seed))
    return train, test


# ----------------------------------------------------------------------------------------------------------
# Partitioning

_DIRICHLET_MAX_TRIES = 100


def _labels_array(labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DatasetError(f"labels must be 1-D, got shape {list(arr.shape)}")
    return arr


def _check_partitions(n: int, num_partitions: int, min_size: int = 1) -> None:
    if num_partitions < 1:
        raise DatasetError(f"number of partitions must be >= 1, got {num_partitions}")
    if n < num_partitions * min_size:
        raise DatasetError(
            f"cannot give {num_partitions} partitions {min_size}+ examples each from {n} examples: "
            f"use fewer partitions (clients) or more data"
        )


def iid_partition(labels: np.ndarray | torch.Tensor, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle (seeded) and cut into ``num_partitions`` parts whose sizes differ by at most one. Each part
    is a sorted int64 index array; parts are disjoint and cover all examples."""
    y = _labels_array(labels)
    _check_partitions(y.size, num_partitions)
    perm = np.random.default_rng(seed).permutation(y.size)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray | torch.Tensor, num_partitions: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed (non-IID) partitions: for each class, the shares of the partitions ~ Dirichlet(alpha)
    (small alpha: each class lands on few partitions).

    Every partition gets at least ``min_size`` examples: the draw is repeated up to
    ``_DIRICHLET_MAX_TRIES`` times; if none satisfies it (likely with tiny alpha and many partitions), the
    draw with the largest smallest partition is kept and random examples are moved, one partition at a
    time, from the currently largest partition to each short one. Disjoint, covers everything, and
    deterministic for a seed (one numpy Generator drives every draw).
    """
    y = _labels_array(labels)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise DatasetError(f"dirichlet alpha must be a positive number, got {alpha!r}")
    if min_size < 0:
        raise DatasetError(f"min_size must be >= 0, got {min_size}")
    _check_partitions(y.size, num_partitions, min_size)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    best: list[list[np.ndarray]] | None = None
    best_min = -1
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for idx in by_class:
            idx = idx[rng.permutation(idx.size)]
            p = rng.dirichlet(np.full(num_partitions, float(alpha)))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # numerically degenerate draw: one owner
                p = np.eye(num_partitions)[rng.integers(num_partitions)]
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
        smallest = min(sum(c.size for c in part) for part in parts)
        if smallest > best_min:
            best, best_min = parts, smallest
        if smallest >= min_size:
            break
    assert best is not None
    result = [np.concatenate(part) if part else np.empty(0, np.int64) for part in best]
    for j in range(num_partitions):
        while result[j].size < min_size:
            donor = int(np.argmax([r.size for r in result]))
            movable = min(min_size - result[j].size, result[donor].size - min_size)
            pick = rng.choice(result[donor].size, size=movable, replace=False)
            keep = np.ones(result[donor].size, dtype=bool)
            keep[pick] = False
            result[j] = np.concatenate([result[j], result[donor][pick]])
            result[donor] = result[donor][keep]
    return [np.sort(r).astype(np.int64) for r in result]


def _class_slots(num_classes: int, num_partitions: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Which k class positions (0..num_classes-1) each partition holds: every class on floor or ceil of
    num_partitions * k / num_classes partitions (the extra ones drawn at random).

    Each partition takes the k classes with the most placements still to make (ties broken at random). That
    never gets stuck: no class ever needs more placements than there are partitions left, so the classes that
    need one in every remaining partition are at most k and are always taken."""
    need = np.full(num_classes, num_partitions * k // num_classes)
    need[rng.permutation(num_classes)[:num_partitions * k % num_classes]] += 1
    slots = []
    for _ in range(num_partitions):
        tie_break = rng.random(num_classes)
        chosen = np.lexsort((tie_break, -need))[:k]  # most needed first
        need[chosen] -= 1
        slots.append(sorted(int(c) for c in chosen))
    return slots


def class_partition(
    labels: np.ndarray | torch.Tensor, num_partitions: int, classes_per_partition: int, seed: int
) -> list[np.ndarray]:
    """Pathological non-IID partitions: each holds examples of exactly ``classes_per_partition`` (K) classes.

    The shard layout of McMahan et al. 2017 (2 classes per client), generalised so that no partition holds
    fewer than K classes: every class lands on about num_partitions * K / num_classes partitions and its
    examples are split as evenly as possible among them. Disjoint, covers every example, deterministic for
    a seed.
    """
    y = _labels_array(labels)
    k = classes_per_partition
    _check_partitions(y.size, num_partitions)
    classes = np.unique(y)
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise DatasetError(f"classes per partition must be a whole number >= 1, got {k!r}: use e.g. classes:2")
    if k > classes.size:
        raise DatasetError(f"{k} classes per partition but the labels hold only {classes.size} classes: "
                           f"use classes:K with K <= {classes.size}")
    if num_partitions * k < classes.size:
        raise DatasetError(f"{num_partitions} partitions x {k} classes each cannot hold all {classes.size} classes "
                           f"(some class would be unused): use classes:{-(-classes.size // num_partitions)} "
                           "or more, or more partitions (clients)")
    rng = np.random.default_rng(seed)
    slots = _class_slots(classes.size, num_partitions, k, rng)
    holders: list[list[int]] = [[] for _ in classes]  # class position -> partitions holding it
    for j, held in enumerate(slots):
        for c in held:
            holders[c].append(j)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c, owners in enumerate(holders):
        idx = np.flatnonzero(y == classes[c])
        if idx.size < len(owners):
            raise DatasetError(f"class {classes[c]} has {idx.size} examples but must be split across "
                               f"{len(owners)} partitions: use a smaller K in classes:K or fewer partitions")
        for j, chunk in zip(owners, np.array_split(idx[rng.permutation(idx.size)], len(owners)), strict=True):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]


def _parse_classes(spec: str, value: str) -> int:
    """K of ``classes:K``: a whole number >= 1."""
    if not value.strip():
        raise DatasetError(f"partitioning {spec!r} needs K, e.g. classes:2 (K classes per partition)")
    try:
        k = int(value)
    except ValueError:
        raise DatasetError(f"partitioning {spec!r}: K {value!r} is not a whole number, e.g. classes:2") from None
    if k < 1:
        raise DatasetError(f"partitioning {spec!r}: K must be at least 1 class per partition, e.g. classes:2")
    return k


def parse_partitioning(spec: str) -> tuple[str, float | int | None]:
    """``"iid"`` -> ``("iid", None)``; ``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``; ``"classes:2"`` ->
    ``("classes", 2)``."""
    text = str(spec).strip().lower()
    if text == "iid":
        return "iid", None
    if text.startswith("classes"):
        name, _, value = text.partition(":")
        if name == "classes":
            return "classes", _parse_classes(spec, value)
    if text.startswith("dirichlet"):
        _, sep, value = text.partition(":")
        if not sep or not value.strip():
            raise DatasetError(f"partitioning {spec!r} needs alpha, e.g. dirichlet:0.5 (smaller: more skew)")
        try:
            alpha = float(value)
        except ValueError:
            raise DatasetError(
                f"partitioning {spec!r}: alpha {value!r} is not a number, e.g. dirichlet:0.5"
            ) from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise DatasetError(f"partitioning {spec!r}: alpha must be a positive number, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    raise DatasetError(f"unknown partitioning {spec!r}: use 'iid', 'dirichlet:ALPHA' (e.g. dirichlet:0.5) or "
                       "'classes:K' (e.g. classes:2)")


def partition(
    labels: np.ndarray | torch.Tensor, num_partitions: int, spec: str, seed: int
) -> list[np.ndarray]:
    """Partition by a spec string (see :func:`parse_partitioning`)."""
    kind, value = parse_partitioning(spec)
    if kind == "iid":
        return iid_partition(labels, num_partitions, seed)
    assert value is not None
    if kind == "classes":
        return class_partition(labels, num_partitions, int(value), seed)
    return dirichlet_partition(labels, num_partitions, value, seed)
