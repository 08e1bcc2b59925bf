"""The data layer: built-in datasets from IDX files, fetching, ImageFolder, npz, batching, partitioners, CLI.

Everything runs on tiny data written here; nothing touches the network or runs apt-get (except a fake
apt-get script, to exercise the Debian-package path end to end)."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noprop import data as D
from noprop import fetch as F
from noprop import partition as P
from noprop import sources as S
from noprop.ops.data_cli import main as cli_main
from noprop.sources import DatasetError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ------------------------------------------------------------------------------------------------ helpers

def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """IDX: magic 0x00000803 (images, ubyte, 3 dims) / 0x00000801 (labels), big-endian dims, raw bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def idx_arrays(n_train: int = 30, n_test: int = 12, size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }


def write_mnist_tree(folder: Path, gz: bool = False, **kw) -> dict[str, np.ndarray]:
    """The four IDX files in ``folder`` (e.g. ROOT/FashionMNIST/raw)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = idx_arrays(**kw)
    for name, arr in arrays.items():
        write_idx(folder / name, arr, gz=gz)
    return arrays


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def save_images(folder: Path, cls: str, n: int, mode: str = "L", size: tuple[int, int] = (6, 5),
                seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    (folder / cls).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        path = folder / cls / f"{cls}{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(path)
    return paths


def denormalise(d: D.LabelledData) -> torch.Tensor:
    view = (1, -1) + (1,) * (d.x.ndim - 2)
    return d.x * torch.tensor(d.std).view(view) + torch.tensor(d.mean).view(view)


# ------------------------------------------------------------------------------------------------ built-ins

@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_tree(tmp_path / "FashionMNIST" / "raw", gz=gz)
    train = D.load_dataset("fashion-mnist", "train", root=tmp_path)
    test = D.load_dataset("fashion-mnist", "test", root=tmp_path, normalise_with=train)

    assert train.x.shape == (30, 1, 8, 8) and test.x.shape == (12, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10 and train.classes == FASHION_CLASSES
    assert train.name == "fashion-mnist" and len(train) == 30
    assert torch.equal(train.y, torch.arange(30) % 10)
    # normalised per channel on the train split; the test split reuses those statistics
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std(unbiased=False).item() - 1) < 1e-4
    assert len(train.mean) == 1 and test.mean == train.mean and test.std == train.std
    raw_test = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    assert torch.allclose(denormalise(test), raw_test, atol=1e-5)
    if gz:  # gzipped-only files are extracted once, for torchvision
        assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_test_split_alone_uses_train_statistics(tmp_path: Path) -> None:
    arrays = write_mnist_tree(tmp_path / "MNIST" / "raw", size=5)
    train = D.load_dataset("mnist", "train", root=tmp_path)
    test = D.load_dataset("mnist", "test", root=tmp_path)
    assert test.mean == train.mean and test.std == train.std
    own_mean = arrays["t10k-images-idx3-ubyte"].mean() / 255
    assert abs(test.mean[0] - own_mean) > 1e-3  # not normalised on its own statistics
    raw_test = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    assert torch.allclose(denormalise(test), raw_test, atol=1e-5)
    train2, test2 = D.load_train_test("MNIST", root=tmp_path)
    assert torch.equal(test2.x, test.x) and train2.name == "mnist"


def test_corrupt_idx_is_a_one_line_dataset_error(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_tree(raw)
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DatasetError, match="corrupt") as err:
        D.load_dataset("fashion-mnist", root=tmp_path)
    assert str(raw) in str(err.value) and "\n" not in str(err.value)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x05\x03" + data[4:])  # unknown magic type
    with pytest.raises(DatasetError, match="corrupt"):
        D.load_dataset("fashion-mnist", root=tmp_path)


def test_image_and_label_counts_must_match(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_tree(raw)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(29, np.uint8))
    with pytest.raises(DatasetError, match="30 images but 29 labels"):
        D.load_dataset("fashion-mnist", root=tmp_path)


def test_missing_and_unknown_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="noprop-data fetch fashion-mnist --root") as err:
        D.load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)
    with pytest.raises(DatasetError, match="pass --download"):
        D.load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'.*fashion-mnist, mnist, cifar10, cifar100"):
        D.load_dataset("svhn", root=tmp_path)
    with pytest.raises(DatasetError, match="split"):
        D.load_dataset("mnist", "validation", root=tmp_path)
    assert not (tmp_path / "FashionMNIST").exists()  # loading never creates folders


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOPROP_DATA", raising=False)
    assert S.default_data_root() == Path("data")
    monkeypatch.setenv("NOPROP_DATA", str(tmp_path))
    assert S.default_data_root() == tmp_path


# ------------------------------------------------------------------------------------------------ fetching

@pytest.fixture
def tiny_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Verification expects the tiny sizes; the system folder points to an empty place."""
    monkeypatch.setattr(F, "FASHION_MNIST_SIZES", {"train": 30, "test": 12})
    monkeypatch.setattr(F, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-copy")
    return tmp_path / "root"


def _must_not_run(*args, **kwargs):
    raise AssertionError("this fetch step must not run")


def test_fetch_when_present_reports_and_touches_nothing(monkeypatch, tmp_path: Path) -> None:
    for step in ("_fetch_from_system", "_fetch_from_apt", "_fetch_from_torchvision"):
        monkeypatch.setattr(F, step, _must_not_run)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_mnist_tree(raw)
    before = snapshot(tmp_path)
    lines: list[str] = []
    assert F.fetch_fashion_mnist(tmp_path, log=lines.append) == raw
    assert len(lines) == 1 and "already present" in lines[0] and str(raw) in lines[0]
    assert snapshot(tmp_path) == before


def test_fetch_from_system_folder(monkeypatch, tiny_fashion: Path, tmp_path: Path) -> None:
    system = tmp_path / "usr-share"
    arrays = write_mnist_tree(system, gz=True)
    monkeypatch.setattr(F, "SYSTEM_FASHION_MNIST_DIR", system)
    monkeypatch.setattr(F, "_fetch_from_apt", _must_not_run)
    monkeypatch.setattr(F, "_fetch_from_torchvision", _must_not_run)
    lines: list[str] = []
    raw = F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert raw == tiny_fashion / "FashionMNIST" / "raw"
    assert len(lines) == 1 and "system folder" in lines[0]
    assert (raw / "train-images-idx3-ubyte").read_bytes()[16:] == arrays["train-images-idx3-ubyte"].tobytes()
    assert len(D.load_dataset("fashion-mnist", root=tiny_fashion)) == 30


def test_fetch_falls_through_in_order(monkeypatch, tiny_fashion: Path, tmp_path: Path) -> None:
    calls: list[str] = []

    def failing(name):
        def step(root, raw, log):
            calls.append(name)
            log(f"{name} failed")
            return False
        return step

    def bad_files(root, raw, log):  # claims success but leaves a wrong-sized set: must be undone
        calls.append("apt")
        write_mnist_tree(raw, n_train=5)
        return True

    def good_files(root, raw, log):  # like torchvision, it would trust files already there
        calls.append("torchvision")
        assert not list(raw.glob("*-ubyte")), "the failed step's files were not removed"
        write_mnist_tree(raw)
        return True

    monkeypatch.setattr(F, "_fetch_from_apt", bad_files)
    monkeypatch.setattr(F, "_fetch_from_torchvision", good_files)
    lines: list[str] = []
    F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert calls == ["apt", "torchvision"]
    assert "no system copy" in lines[0] and "expected 30" in lines[1]
    assert len(D.load_dataset("fashion-mnist", root=tiny_fashion)) == 30

    calls.clear()
    shutil.rmtree(tiny_fashion)
    for step in ("_fetch_from_system", "_fetch_from_apt", "_fetch_from_torchvision"):
        monkeypatch.setattr(F, step, failing(step))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as err:
        F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert calls == ["_fetch_from_system", "_fetch_from_apt", "_fetch_from_torchvision"]
    assert str(tiny_fashion / "FashionMNIST" / "raw") in str(err.value) and "\n" not in str(err.value)


def test_step_raising_oserror_falls_through(monkeypatch, tiny_fashion: Path) -> None:
    def broken(root, raw, log):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(F, "_fetch_from_system", broken)
    monkeypatch.setattr(F, "_fetch_from_apt", lambda root, raw, log: write_mnist_tree(raw) is not None)
    monkeypatch.setattr(F, "_fetch_from_torchvision", _must_not_run)
    lines: list[str] = []
    F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert "read-only file system" in lines[0]


def test_apt_step_unpacks_a_debian_package(monkeypatch, tiny_fashion: Path, tmp_path: Path) -> None:
    """A fake apt-get that 'downloads' a .deb built here: exercises download + dpkg-deb -x + install.

    No skip: the step needs dpkg-deb wherever apt-get runs (apt depends on dpkg, which Debian marks essential),
    so a CI machine without it cannot test, nor use, the path this test protects."""
    assert shutil.which("dpkg-deb"), "dpkg-deb is missing: install dpkg (the apt step and this test need it)"
    pkg = tmp_path / "pkg"
    arrays = write_mnist_tree(pkg / "usr" / "share" / "datasets" / "fashion-mnist", gz=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
        "Maintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    fake = tmp_path / "apt-get"
    fake.write_text(f'#!/bin/sh\n[ "$1 $2" = "download dataset-fashion-mnist" ] || exit 3\ncp "{deb}" .\n')
    fake.chmod(0o755)
    monkeypatch.setattr(F, "APT_GET", str(fake))
    monkeypatch.setattr(F, "_fetch_from_torchvision", _must_not_run)
    lines: list[str] = []
    raw = F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert "Debian package" in lines[-1]
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[8:] == arrays["t10k-labels-idx1-ubyte"].tobytes()

    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    shutil.rmtree(tiny_fashion)
    monkeypatch.setattr(F, "_fetch_from_torchvision", lambda root, raw, log: False)
    with pytest.raises(DatasetError):
        F.fetch_fashion_mnist(tiny_fashion, log=lines.append)
    assert any("Unable to locate package" in line for line in lines)

    lines.clear()  # without dpkg-deb the step says so and gives way to the next source
    monkeypatch.setattr(F, "DPKG_DEB", str(tmp_path / "no-dpkg-deb"))
    assert F._fetch_from_apt(tiny_fashion, tiny_fashion / "FashionMNIST" / "raw", lines.append) is False
    assert lines == [f"{fake}/{tmp_path / 'no-dpkg-deb'} not available: skipping the Debian package "
                     "dataset-fashion-mnist"]


# ------------------------------------------------------------------------------------------------ ImageFolder

def test_imagefolder_grayscale_with_holdout(tmp_path: Path) -> None:
    for i, cls in enumerate(["cat", "dog"]):
        save_images(tmp_path, cls, 5, "L", seed=i)
    train, test = D.load_train_test(f"imagefolder:{tmp_path}")
    assert train.x.shape == (8, 1, 5, 6) and test.x.shape == (2, 1, 5, 6)  # PIL size is (W, H)
    assert train.classes == ["cat", "dog"] and sorted(test.y.tolist()) == [0, 1]  # stratified 20%
    assert test.mean == train.mean
    again, _ = D.load_train_test(f"imagefolder:{tmp_path}")
    assert torch.equal(again.x, train.x)  # the holdout is seeded
    train_px = {tuple(r) for r in (denormalise(train) * 255).round().flatten(1).tolist()}
    test_px = {tuple(r) for r in (denormalise(test) * 255).round().flatten(1).tolist()}
    assert len(train_px) == 8 and not train_px & test_px


def test_imagefolder_rgb_with_train_test_folders(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "b", "c"]):
        save_images(tmp_path / "train", cls, 3, "RGB", size=(4, 4), seed=i)
    save_images(tmp_path / "test", "b", 2, "RGB", size=(4, 4), seed=9)  # test holds only class b
    train, test = D.load_train_test(f"imagefolder:{tmp_path}")
    assert train.x.shape == (9, 3, 4, 4) and test.x.shape == (2, 3, 4, 4)
    assert len(train.mean) == 3 and torch.equal(test.y, torch.tensor([1, 1]))
    assert torch.allclose(train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    first = np.asarray(Image.open(tmp_path / "test" / "b" / "b0.png")).transpose(2, 0, 1) / 255
    assert torch.allclose(denormalise(test)[0], torch.tensor(first, dtype=torch.float32), atol=1e-5)


def test_imagefolder_mixed_modes_become_rgb(tmp_path: Path) -> None:
    save_images(tmp_path, "a", 5, "L", size=(4, 4))
    save_images(tmp_path, "b", 5, "RGB", size=(4, 4))
    train = D.load_dataset(f"imagefolder:{tmp_path}")
    assert train.input_shape == (3, 4, 4)


def test_imagefolder_errors(tmp_path: Path) -> None:
    save_images(tmp_path, "a", 3, "L", size=(4, 4))
    odd = save_images(tmp_path, "b", 3, "L", size=(5, 4))
    with pytest.raises(DatasetError, match="share one size") as err:
        D.load_dataset(f"imagefolder:{tmp_path}")
    assert str(odd[0]) in str(err.value)
    with pytest.raises(DatasetError, match="not found"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=str(empty)):
        D.load_dataset(f"imagefolder:{empty}")
    bad = tmp_path / "bad"
    save_images(bad, "a", 3, "L", size=(4, 4))
    (bad / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        D.load_dataset(f"imagefolder:{bad}")


# ------------------------------------------------------------------------------------------------ npz

def test_npz_channels_last_train_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 6, 5, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(20) % 4, x_test=x_test, y_test=np.arange(7) % 4,
             classes=np.array(["w", "x", "y", "z"]))
    train, test = D.load_train_test(f"npz:{path}")
    assert train.x.shape == (20, 3, 6, 5) and test.x.shape == (7, 3, 6, 5)
    assert train.classes == ["w", "x", "y", "z"] and train.y.dtype == torch.int64
    expected = torch.from_numpy(x_test.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    assert torch.allclose(denormalise(test), expected, atol=1e-5)


@pytest.mark.parametrize(
    "shape,dtype,expected",
    [
        ((10, 7, 7), np.uint8, (1, 7, 7)),  # [N, H, W] -> one channel
        ((10, 2, 7, 7), np.float32, (2, 7, 7)),  # [N, C, H, W] kept
        ((10, 7, 7, 1), np.uint8, (1, 7, 7)),  # channels-last, one channel
        ((10, 4), np.float64, (4,)),  # tabular kept flat
    ],
)
def test_npz_layouts(tmp_path: Path, shape, dtype, expected) -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(shape) * (255 if dtype == np.uint8 else 10)).astype(dtype)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=np.arange(10) % 2, x_test=x[:3], y_test=np.array([0, 1, 1]))
    train = D.load_dataset(f"npz:{path}")
    assert train.input_shape == expected and train.classes == ["0", "1"]
    assert len(train.mean) == expected[0]  # per channel, or per feature for tabular
    scale = 255.0 if dtype == np.uint8 else 1.0  # uint8 scaled to [0, 1], floats kept
    raw = torch.from_numpy(x.astype(np.float32) / scale).reshape(10, *expected)
    assert torch.allclose(denormalise(train), raw, atol=1e-4)


def test_npz_tabular_per_feature_normalisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = np.stack([rng.normal(100, 20, 50), rng.normal(0, 0.01, 50), np.full(50, 3.0)], axis=1)
    path = tmp_path / "t.npz"
    np.savez(path, x=x, y=np.arange(50) % 5)
    train, test = D.load_train_test(f"npz:{path}")
    assert train.input_shape == (3,) and len(train) == 40 and len(test) == 10
    assert torch.allclose(train.x[:, :2].mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(train.x[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert train.std[2] == 1.0 and torch.all(train.x[:, 2] == 0)  # constant feature: not divided by 0
    assert sorted(test.y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"a": np.zeros(3)}, "needs arrays x_train"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, np.int64)}, "4 rows but y has 3"),
        ({"x": np.zeros((4, 2, 2, 2, 2)), "y": np.zeros(4, np.int64)}, "x must be"),
        ({"x": np.zeros(4), "y": np.zeros(4, np.int64)}, "2 to 4 dimensions"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 1, 2, 0, 1]), "classes": np.array(["a", "b"])},
         "label 2 is out of range for 2 classes"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 0.5, 1, 0, 1])}, "non-integer"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, -1, 1, 0, 1])}, "found -1"),
        ({"x": np.zeros((5, 2)), "y": np.eye(5)}, "one-hot"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.full((5, 2), np.nan), "y": np.zeros(5, np.int64)}, "NaN"),
        ({"x_train": np.zeros((5, 2)), "y_train": np.zeros(5, np.int64),
          "x_test": np.zeros((5, 3)), "y_test": np.zeros(5, np.int64)}, "make them match"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5, np.int64), "classes": np.array(["a", 1], dtype=object)},
         "string array"),
    ],
)
def test_malformed_npz(tmp_path: Path, arrays, match) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=match) as err:
        D.load_train_test(f"npz:{path}")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_npz_unreadable_or_missing(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="np.savez") as err:
        D.load_dataset(f"npz:{path}")
    assert str(path) in str(err.value)
    with pytest.raises(DatasetError, match="not found"):
        D.load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(DatasetError, match="needs a path"):
        D.load_dataset("npz:")
    with pytest.raises(DatasetError, match=rf"{tmp_path} is a folder, not an .npz file: .*imagefolder:{tmp_path}"):
        D.load_dataset(f"npz:{tmp_path}")


def test_a_bare_path_is_read_as_what_it_is(tmp_path: Path, monkeypatch) -> None:
    """An .npz file or a folder of class folders, named without npz: / imagefolder:, loads as with the prefix."""
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (20, 6, 5), dtype=np.uint8), y=np.arange(20) % 4)
    folder = tmp_path / "images"
    for i, cls in enumerate(["cat", "dog"]):
        save_images(folder, cls, 5, "L", seed=i)
    monkeypatch.chdir(tmp_path)
    for bare, spec in ((str(path), f"npz:{path}"), ("d.npz", f"npz:{path}"), (str(folder), f"imagefolder:{folder}"),
                       ("images", f"imagefolder:{folder}")):
        got, want = D.load_dataset(bare, "test"), D.load_dataset(spec, "test")
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y) and got.classes == want.classes, bare
    with pytest.raises(DatasetError, match="npz file not found"):  # a name ending in .npz is a file that is missing
        D.load_dataset("missing.npz")
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'.*or the path of an existing .npz file or image"):
        D.load_dataset("svhn")


# ------------------------------------------------------------------------------------------------ in memory

@pytest.fixture
def npz_source(tmp_path: Path) -> str:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), [40, 30, 20, 10])
    path = tmp_path / "s.npz"
    np.savez(path, x_train=rng.random((100, 3)).astype(np.float32), y_train=y,
             x_test=rng.random((8, 3)).astype(np.float32), y_test=np.arange(8) % 4)
    return f"npz:{path}"


def test_batches(npz_source: str) -> None:
    train = D.load_dataset(npz_source)
    seen = torch.cat([y for _, y in train.batches(32, shuffle=False)])
    assert torch.equal(seen, train.y)
    sizes = [x.shape[0] for x, _ in train.batches(32)]
    assert sizes == [32, 32, 32, 4] and [x.shape[0] for x, _ in train.batches(32, drop_last=True)] == [32] * 3
    order = [torch.cat([x[:, 0] for x, _ in train.batches(16, generator=torch.Generator().manual_seed(s))])
             for s in (5, 5, 6)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])
    assert sorted(order[0].tolist()) == sorted(train.x[:, 0].tolist())  # a permutation: each once
    x, y = next(iter(train.batches(10)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3)
    with pytest.raises(ValueError):
        train.batches(0)


def test_stratified_subset(npz_source: str) -> None:
    train_full, test_full = D.load_train_test(npz_source)
    train, test = D.load_train_test(npz_source, subset=20, seed=1)
    assert len(train) == 20 and torch.equal(test.x, test_full.x)
    assert train.y.bincount().tolist() == [8, 6, 4, 2]  # proportional to 40/30/20/10
    assert train.mean == train_full.mean  # statistics from the full train split
    same, _ = D.load_train_test(npz_source, subset=20, seed=1)
    other, _ = D.load_train_test(npz_source, subset=20, seed=2)
    assert torch.equal(same.x, train.x) and not torch.equal(other.x, train.x)
    tiny, _ = D.load_train_test(npz_source, subset=5, seed=0)
    assert sorted(tiny.y.tolist()) == [0, 0, 1, 2, 3]  # every class kept when the subset allows
    assert len(D.load_train_test(npz_source, subset=1000)[0]) == 100
    with pytest.raises(DatasetError):
        D.load_train_test(npz_source, subset=0)
    part = train_full.subset(np.array([3, 1]))
    assert torch.equal(part.x, train_full.x[[3, 1]]) and part.classes == train_full.classes


# ---------------------------------------------------------------------------------------------- partitioners

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes


def _entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    out = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=10)
        q = counts[counts > 0] / counts.sum()
        out.append(-(q * np.log(q)).sum())
    return float(np.mean(out))


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint and complete
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.01", "classes:2"])
def test_partition_cover_and_determinism(spec: str) -> None:
    parts = P.partition(LABELS, 7, spec, seed=0)
    assert len(parts) == 7 and all(p.size > 0 for p in parts)
    _assert_exact_cover(parts, LABELS.size)
    again = P.partition(torch.from_numpy(LABELS), 7, spec, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = P.partition(LABELS, 7, spec, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_balanced() -> None:
    sizes = [p.size for p in P.iid_partition(LABELS, 7, seed=3)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 600


def test_dirichlet_every_partition_non_empty_with_tiny_alpha() -> None:
    parts = P.dirichlet_partition(LABELS, 50, alpha=0.01, seed=0)
    assert all(p.size >= 1 for p in parts)
    _assert_exact_cover(parts, 600)
    parts = P.dirichlet_partition(LABELS[:100], 20, alpha=0.01, seed=4, min_size=5)
    assert all(p.size >= 5 for p in parts)
    _assert_exact_cover(parts, 100)
    with pytest.raises(DatasetError, match="fewer partitions"):
        P.dirichlet_partition(LABELS[:10], 5, alpha=1.0, seed=0, min_size=3)


def test_dirichlet_skew_visible() -> None:
    iid = _entropy(LABELS, P.iid_partition(LABELS, 10, seed=0))
    skewed = _entropy(LABELS, P.dirichlet_partition(LABELS, 10, alpha=0.1, seed=0))
    mild = _entropy(LABELS, P.dirichlet_partition(LABELS, 10, alpha=100.0, seed=0))
    assert skewed < 0.6 * iid and mild > 0.9 * iid and iid > 2.0


def test_parse_partitioning() -> None:
    assert P.parse_partitioning("iid") == ("iid", None)
    assert P.parse_partitioning(" IID ") == ("iid", None)
    assert P.parse_partitioning("dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ["", "random", "iid:2", "dirichlet", "dirichlet:", "dirichlet:abc", "dirichlet:0",
                "dirichlet:-1", "dirichlet:nan", "dirichlet:inf"]:
        with pytest.raises(DatasetError):
            P.parse_partitioning(bad)
    with pytest.raises(DatasetError, match="fewer partitions"):
        P.partition(LABELS[:3], 4, "iid", seed=0)
    with pytest.raises(DatasetError):
        P.iid_partition(LABELS, 0, seed=0)


def _classes_of(labels: np.ndarray, parts: list[np.ndarray]) -> list[set[int]]:
    return [set(np.unique(labels[p]).tolist()) for p in parts]


@pytest.mark.parametrize("num_partitions, k", [(10, 2), (7, 2), (5, 3), (3, 4), (10, 1), (4, 10), (13, 7), (1, 10)])
def test_class_partition_gives_every_partition_exactly_k_classes(num_partitions: int, k: int) -> None:
    parts = P.class_partition(LABELS, num_partitions, k, seed=3)
    assert len(parts) == num_partitions
    assert all(len(held) == k for held in _classes_of(LABELS, parts))
    _assert_exact_cover(parts, LABELS.size)
    spread = [sum(c in held for held in _classes_of(LABELS, parts)) for c in range(10)]
    assert max(spread) - min(spread) <= 1 and sum(spread) == num_partitions * k  # classes spread evenly
    for c in range(10):  # and each class's examples split evenly among its partitions
        shares = [int((LABELS[p] == c).sum()) for p in parts if (LABELS[p] == c).any()]
        assert max(shares) - min(shares) <= 1 and sum(shares) == 60


def test_class_partition_is_deterministic_for_a_seed() -> None:
    parts = P.class_partition(LABELS, 10, 2, seed=0)
    again = P.partition(torch.from_numpy(LABELS), 10, "classes:2", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = P.class_partition(LABELS, 10, 2, seed=1)
    assert _classes_of(LABELS, parts) != _classes_of(LABELS, other)  # another seed, another class layout


def test_class_partition_is_balanced_on_fashion_mnist_sized_labels() -> None:
    """10 classes x 6000, 10 clients, 2 classes each (McMahan et al.'s layout): every class on exactly 2 clients,
    3000 of its examples on each, so every client holds 6000."""
    labels = np.repeat(np.arange(10), 6000)
    parts = P.class_partition(labels, 10, 2, seed=0)
    _assert_exact_cover(parts, labels.size)
    assert [p.size for p in parts] == [6000] * 10
    held = _classes_of(labels, parts)
    assert [sum(c in h for h in held) for c in range(10)] == [2] * 10
    assert all(np.bincount(labels[p], minlength=10).max() == 3000 for p in parts)
    # uneven class sizes (the 2017 paper's MNIST is not balanced): sizes stay within the largest class's share
    uneven = np.concatenate([np.full(5000 + 200 * c, c) for c in range(10)])
    sizes = [p.size for p in P.class_partition(uneven, 10, 2, seed=0)]
    assert sum(sizes) == uneven.size and max(sizes) - min(sizes) <= 2 * 900


@pytest.mark.parametrize("num_partitions, k, labels, message", [
    (4, 0, LABELS, "whole number >= 1"),
    (4, -1, LABELS, "whole number >= 1"),
    (4, 11, LABELS, "the labels hold only 10 classes: use classes:K with K <= 10"),
    (4, 2, LABELS, "cannot hold all 10 classes (some class would be unused): use classes:3 or more"),
    (11, 2, np.concatenate([LABELS, [10]]), "class 10 has 1 examples but must be split across 2 partitions"),
    (0, 2, LABELS, "number of partitions must be >= 1"),
])
def test_class_partition_errors_say_what_to_do(num_partitions: int, k: int, labels: np.ndarray,
                                               message: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(message)) as exc:
        P.class_partition(labels, num_partitions, k, seed=0)
    assert "\n" not in str(exc.value)


def test_parse_class_partitioning() -> None:
    assert P.parse_partitioning("classes:2") == ("classes", 2)
    assert P.parse_partitioning(" Classes:10 ") == ("classes", 10)
    for bad, message in [("classes", "needs K"), ("classes:", "needs K"), ("classes:two", "not a whole number"),
                         ("classes:1.5", "not a whole number"), ("classes:0", "at least 1"),
                         ("classes:-2", "at least 1"), ("classesx:2", "unknown partitioning")]:
        with pytest.raises(DatasetError, match=message):
            P.parse_partitioning(bad)
    with pytest.raises(DatasetError, match="K <= 10"):  # the data-dependent checks, through the spec
        P.partition(LABELS, 4, "classes:11", seed=0)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_fetch_present(tmp_path: Path, capsys) -> None:
    write_mnist_tree(tmp_path / "FashionMNIST" / "raw")
    assert cli_main(["fetch", "fashion-mnist", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "already present" in out and str(tmp_path / "FashionMNIST" / "raw") in out


def test_cli_fetch_all_sources_fail(monkeypatch, tmp_path: Path, capsys) -> None:
    for step in ("_fetch_from_system", "_fetch_from_apt", "_fetch_from_torchvision"):
        monkeypatch.setattr(F, step, lambda root, raw, log: False)
    assert cli_main(["fetch", "fashion-mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not fetch Fashion-MNIST") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_info(npz_source: str, tmp_path: Path, capsys) -> None:
    assert cli_main(["info", npz_source]) == 0
    out = capsys.readouterr().out
    assert "100 / 8 examples" in out and "[3]" in out
    assert any(line.split() == ["0", "40", "2"] for line in out.splitlines())
    assert cli_main(["info", "fashion-mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Fashion-MNIST not found") and err.count("\n") == 1


def test_cli_fetch_mnist_without_network(monkeypatch, tmp_path: Path, capsys) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    assert cli_main(["fetch", "mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not download MNIST into {tmp_path / 'MNIST' / 'raw'}")
    assert "check the network" in err and err.count("\n") == 1


def test_samples_writes_each_class_in_turn_as_the_raw_test_pixels(tmp_path: Path, capsys) -> None:
    """noprop-data samples: PNG files that noprop-edge predict reads, holding the test split's own pixels (not the
    normalised tensors), named by index and class, the classes taken in turn."""
    raw = tmp_path / "FashionMNIST" / "raw"
    arrays = write_mnist_tree(raw, n_test=12)
    labels = np.array([5, 5, 5, 2, 2, 7, 7, 7, 7, 2, 5, 1], np.uint8)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    assert cli_main(["samples", "fashion-mnist", "--root", str(tmp_path), "--out", str(tmp_path / "s"),
                     "--count", "6"]) == 0
    printed = capsys.readouterr().out
    files = [Path(line) for line in printed.splitlines() if line.endswith(".png") and " " not in line]
    # classes 1, 2, 5, 7 in turn: the first image of each, then the second of those that have one
    assert [int(f.name.split("-")[0]) for f in files] == [11, 3, 0, 5, 4, 1], printed
    assert sorted(files) == sorted((tmp_path / "s").glob("*.png"))
    for f in files:
        index = int(f.name.split("-")[0])
        assert f.name.removesuffix(".png").split("-", 1)[1] == re.sub(
            r"[^a-z0-9]", "-", FASHION_CLASSES[labels[index]].lower()).strip("-")
        np.testing.assert_array_equal(np.asarray(Image.open(f)), arrays["t10k-images-idx3-ubyte"][index])
    assert "noprop-edge predict" in printed
    assert cli_main(["samples", "fashion-mnist", "--root", str(tmp_path), "--out", str(tmp_path / "t"),
                     "--count", "0"]) == 2 and not (tmp_path / "t").exists()
