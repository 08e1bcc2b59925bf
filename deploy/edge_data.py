"""noprop-edge's inputs and outputs: image files, .npy arrays and labelled data read into the model's layout, and
predictions printed.

Used by edge_cli.py (the command line) and edge_client.py; apart from edge.py, the runtime, which takes arrays.
Like edge_cli.py it also works as a loose copy beside edge.py on a device: it needs numpy, Pillow for image files
(imported when one is read), and edge.py (the noprop-fl package's, else the copy beside this file).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

try:
    from noprop.deploy.edge import EdgeError, ModelInfo, one_line
except ImportError:  # a loose copy beside edge.py on a device, without the noprop package
    from edge import EdgeError, ModelInfo, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise EdgeError("reading image files needs Pillow: pip install pillow (or pass .npy arrays)") from None
    return Image, UnidentifiedImageError


def _to_model_layout(x: np.ndarray, shape: tuple[int, ...], batched: bool, where: str) -> np.ndarray:
    """Arrays in [H, W], [H, W, C] or [C, H, W] (with a leading N when batched) -> [(N,) C, H, W]."""
    lead = 1 if batched else 0
    body = tuple(x.shape[lead:])
    if body == shape:
        return x
    if len(shape) == 3:
        c, h, w = shape
        if c == 1 and body == (h, w):
            return np.expand_dims(x, lead)
        if body == (h, w, c):
            return np.moveaxis(x, -1, lead)
    expected = "[N, ...]" if batched else "one example"
    raise EdgeError(f"{where} has shape {list(x.shape)} but the model takes {expected} of "
                    f"{list(shape)} ({'C, H, W' if len(shape) == 3 else 'F'}; [H, W, C] and [H, W] are also read)")


def _scale(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 / 255, uint16 / 65535, floats and bools as they are."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    if x.dtype.kind in "fb":
        return x.astype(np.float32)
    if x.dtype.kind in "iu":
        raise EdgeError(f"{where} holds {x.dtype} values: save images as uint8 (0..255) or float in [0, 1]")
    raise EdgeError(f"{where} must be numeric, got dtype {x.dtype}")


def load_image(path: str | Path, input_shape: tuple[int, ...], resize: bool = False,
               convert: bool = False) -> np.ndarray:
    """One input file -> float32 [C, H, W] (or [F]) in raw scale, checked against the model's input shape.

    Image files (Pillow): the size and the channel count must match the model unless resize / convert allow
    adapting them; an RGB image whose three channels are equal counts as grayscale; alpha is dropped. .npy
    files hold one example ([H, W], [H, W, C], [C, H, W] or [F]; uint8 or float in [0, 1]).
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"input file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise EdgeError(f"{path} is not a readable .npy array ({one_line(exc, 100)})") from None
        return _to_model_layout(_scale(arr, str(path)), tuple(input_shape), False, str(path))
    if len(input_shape) != 3:
        raise EdgeError(f"the model takes feature vectors {list(input_shape)}, not images: pass {path.stem}.npy")
    image_mod, unidentified = _pil()
    c, h, w = input_shape
    names = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    try:
        with image_mod.open(path) as im:
            im.load()
            if im.mode in _GRAY_MODES:
                file_channels = 1
                if im.mode in ("1", "LA"):
                    im = im.convert("L")
            else:
                im = im.convert("RGB")
                rgb = np.asarray(im)
                file_channels = 1 if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else 3
                if file_channels == 1:
                    im = im.convert("L")  # exact: the weights of L sum to 1 and the channels are equal
            if file_channels != c:
                if not convert or c not in names:
                    hint = ": pass --convert to convert it" if c in names else ""
                    raise EdgeError(f"{path} is {names[file_channels]} but the model takes "
                                    f"{names.get(c, f'{c}-channel')} images{hint}")
                im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                if not resize:
                    raise EdgeError(f"{path} is {im.size[0]}x{im.size[1]} but the model takes {w}x{h} images: "
                                    "pass --resize to scale it")
                im = im.resize((w, h), image_mod.BILINEAR)
            arr = np.asarray(im)
    except (OSError, unidentified, ValueError) as exc:
        raise EdgeError(f"cannot read image {path} ({one_line(exc, 100)})") from None
    if arr.dtype == np.int32:  # Pillow mode "I": 16-bit PNGs
        arr = arr.astype(np.uint16)
    x = _scale(arr, str(path))
    return x[None] if c == 1 else np.moveaxis(x, -1, 0)


def load_images(paths: list[str | Path], input_shape: tuple[int, ...], resize: bool = False,
                convert: bool = False) -> np.ndarray:
    if not paths:
        raise EdgeError("no input files given")
    return np.stack([load_image(p, input_shape, resize, convert) for p in paths]).astype(np.float32)


def load_eval_data(spec: str | Path, info: ModelInfo, limit: int | None = None, resize: bool = False,
                   convert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs [N, ...] and labels [N] from an .npz (x_test, y_test or x, y), a folder of IDX test files
    (t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, optionally .gz: MNIST / Fashion-MNIST, e.g.
    data/FashionMNIST/raw), or a folder of class folders (DIR/test if it exists, else DIR; one subfolder per
    class, named as the model's class names).
    """
    path = Path(spec)
    idx = _find_idx(path) if path.is_dir() else None
    if idx is not None:
        x = _read_idx(idx[0], 3, where=str(idx[0]))
        y = _read_idx(idx[1], 1, where=str(idx[1])).astype(np.int64)
        if len(x) != len(y):
            raise EdgeError(f"{path}: {len(x)} images but {len(y)} labels in its IDX files")
        if len(y) and y.max() >= info.num_classes:
            raise EdgeError(f"{path}: labels outside 0..{info.num_classes - 1}")
        if limit:
            x, y = x[:limit], y[:limit]
        x = _to_model_layout(_scale(x, str(idx[0])), info.input_shape, True, str(idx[0]))
        return np.ascontiguousarray(x, dtype=np.float32), y
    if path.is_dir():
        root = path / "test" if (path / "test").is_dir() else path
        files, labels = [], []
        index = {name: i for i, name in enumerate(info.class_names)}
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise EdgeError(f"{root}: folders {', '.join(unknown[:5])} are not classes of the model "
                            f"({', '.join(info.class_names[:10])}{' ...' if info.num_classes > 10 else ''})")
        for folder in folders:
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"):
                    files.append(f)
                    labels.append(index[folder.name])
        if not files:
            raise EdgeError(f"{root} holds no images: expected one subfolder per class")
        if limit:
            files, labels = files[:limit], labels[:limit]
        return load_images(files, info.input_shape, resize, convert), np.asarray(labels, dtype=np.int64)
    if not path.is_file():
        raise EdgeError(f"evaluation data {path} does not exist: pass an .npz file or a folder of class folders")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xk, yk = ("x_test", "y_test") if {"x_test", "y_test"} <= keys else ("x", "y")
            if not {xk, yk} <= keys:
                raise EdgeError(f"{path}: needs arrays x_test, y_test (or x, y); found {sorted(keys) or 'none'}")
            x, y = z[xk], z[yk]
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in keys else None
    except EdgeError:
        raise
    except Exception as exc:
        raise EdgeError(f"{path} is not a readable .npz archive ({one_line(exc, 100)}): write it with np.savez") \
            from None
    if classes is not None and classes != info.class_names:
        raise EdgeError(f"{path}: its classes {classes[:5]} differ from the model's {info.class_names[:5]}")
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iu" or len(y) != len(x):
        raise EdgeError(f"{path}: {yk} must hold one integer label per row of {xk}")
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise EdgeError(f"{path}: labels outside 0..{info.num_classes - 1}")
    if limit:
        x, y = x[:limit], y[:limit]
    x = _to_model_layout(_scale(x, str(path)), info.input_shape, True, f"{path} [{xk}]")
    if info.input_layout == "NCHW" and x.size and (x.min() < -0.01 or x.max() > 1.01):
        raise EdgeError(f"{path}: {xk} holds values in [{x.min():.3g}, {x.max():.3g}] but the model takes raw "
                        "pixels in [0, 1] (uint8 / 255), not normalised ones")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path) -> tuple[Path, Path] | None:
    for base in (folder, folder / "raw"):
        found = []
        for name in _IDX_TEST:
            candidates = [base / name, base / f"{name}.gz"]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def _read_idx(path: Path, ndim: int, where: str) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format): magic 0x0000 08 <ndim>, big-endian sizes, data."""
    import gzip

    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise EdgeError(f"cannot read {where} ({one_line(exc, 100)})") from None
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise EdgeError(f"{where} is not an IDX file of {ndim}-dimensional unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise EdgeError(f"{where} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


def print_predictions(results: list[dict], as_json: bool, seed: int | None = None, drawn: bool = False) -> None:
    """seed: of a stochastic model's noise; in every JSON row, and on stderr when drawn (the user gave none)."""
    if seed is not None:
        results = [{**r, "seed": seed} for r in results]
        if drawn:
            print(f"noprop-edge: noise seed {seed} (pass --seed {seed} to repeat this)", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['file']}\t{r['label']}\t{r['class']}\t{r['probability']:.4f}")
