"""Fetching the built-in datasets: Fashion-MNIST from the system, the Debian package or torchvision.

Fashion-MNIST is fetched by :func:`fetch_fashion_mnist` (system copy, Debian package via ``apt-get download``,
then torchvision's downloader); the others by torchvision's downloader (:func:`fetch_dataset`, or
:func:`noprop.data.load_dataset` with ``download=True``).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from noprop.sources import _PRETTY, _TORCHVISION, DATASETS, SPLITS, DatasetError, _builtin_key, _one_line, _root

__all__ = ["fetch_dataset", "fetch_fashion_mnist"]

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


def _torchvision_dataset(key: str, split: str, root: Path, download: bool):  # noqa: ANN202 - torchvision type
    """Instantiate the torchvision dataset, turning its exceptions into one-line DatasetErrors. It lives here,
    not with the format readers, because ``download=True`` fetches (Fashion-MNIST through
    :func:`fetch_fashion_mnist`)."""
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
