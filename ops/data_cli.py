"""``noprop-data``: fetch the built-in datasets and describe any dataset.

    noprop-data fetch fashion-mnist [--root DIR]     system copy, Debian package, then torchvision
    noprop-data fetch mnist|cifar10|cifar100 [--root DIR]   torchvision's downloader (needs internet)
    noprop-data info NAME [--root DIR] [--download]  sizes, input shape, classes, per-class counts
    noprop-data samples NAME --out DIR [--count N]   test images as PNG files, to try noprop-edge predict on

Errors are one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from noprop.data import LabelledData, load_train_test
from noprop.fetch import fetch_dataset
from noprop.ops.cli import OneLineParser
from noprop.sources import DATASETS, DatasetError, default_data_root


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="noprop-data", description="Fetch and inspect noprop-fl datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    root_help = "data folder (default: $NOPROP_DATA, else ./data)"

    f = sub.add_parser("fetch", help="put a built-in dataset under --root")
    f.add_argument("name", choices=DATASETS, help="which dataset")
    f.add_argument("--root", type=Path, default=None, help=root_help)

    i = sub.add_parser("info", help="sizes, input shape, classes and per-class counts of a dataset")
    i.add_argument("name", help=f"one of {', '.join(DATASETS)}, imagefolder:PATH, npz:PATH")
    i.add_argument("--root", type=Path, default=None, help=root_help)
    i.add_argument("--download", action="store_true", help="download a missing built-in dataset first")

    s = sub.add_parser("samples", help="write test images as PNG files named by their class (for noprop-edge predict)")
    s.add_argument("name", help=f"one of {', '.join(DATASETS)}, imagefolder:PATH, npz:PATH")
    s.add_argument("--root", type=Path, default=None, help=root_help)
    s.add_argument("--out", type=Path, required=True, help="folder for the PNG files (made if missing)")
    s.add_argument("--count", type=int, default=10, help="how many images, one class after another (default: 10)")
    return p


def _counts(data: LabelledData) -> list[int]:
    return data.y.bincount(minlength=data.num_classes).tolist()


def _info(args: argparse.Namespace) -> None:
    train, test = load_train_test(args.name, root=args.root, download=args.download)
    print(f"dataset      {train.name}")
    print(f"train/test   {len(train)} / {len(test)} examples")
    print(f"input shape  {list(train.input_shape)}")
    print(f"classes      {train.num_classes}")
    print(f"mean         {[round(m, 4) for m in train.mean]}")
    print(f"std          {[round(s, 4) for s in train.std]}")
    width = max(len("class"), *(len(c) for c in train.classes))
    print(f"{'class':<{width}}  {'train':>7}  {'test':>7}")
    for name, n_train, n_test in zip(train.classes, _counts(train), _counts(test), strict=True):
        print(f"{name:<{width}}  {n_train:>7}  {n_test:>7}")


def _fetch(args: argparse.Namespace) -> None:
    root = args.root if args.root is not None else default_data_root()
    start = time.perf_counter()
    folder = fetch_dataset(args.name, root, log=print)
    print(f"{args.name} ready in {folder} ({time.perf_counter() - start:.1f} s); use --root {root}")


def _samples(args: argparse.Namespace) -> None:
    """The first test image of each class in turn, in raw pixels (what a camera gives the device), as
    OUT/INDEX-CLASS.png: INDEX is the image's place in the test split, CLASS its label's name."""
    from PIL import Image  # torchvision's dependency: there wherever this command is

    if args.count < 1:
        raise DatasetError(f"--count must be at least 1, got {args.count}")
    test = load_train_test(args.name, root=args.root)[1]
    if test.x.ndim != 4 or test.x.shape[1] not in (1, 3):
        raise DatasetError(f"{test.name} holds no images (examples of shape {list(test.input_shape)}): samples "
                           "writes image datasets only")
    labels = test.y.numpy()
    order = [np.flatnonzero(labels == k) for k in range(test.num_classes)]
    picked = [int(idx[i]) for i in range(max(map(len, order))) for idx in order if i < len(idx)][:args.count]
    view = (1, -1, 1, 1)
    raw = test.x[picked] * torch.tensor(test.std).view(view) + torch.tensor(test.mean).view(view)
    pixels = (raw.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    for index, image in zip(picked, pixels, strict=True):
        name = "".join(c if c.isalnum() else "-" for c in test.classes[labels[index]].lower()).strip("-")
        path = args.out / f"{index:05d}-{name}.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        print(path)
    print(f"{len(picked)} {test.name} test images in {args.out}: noprop-edge predict MODEL.onnx {args.out}/*.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            _fetch(args)
        elif args.command == "samples":
            _samples(args)
        else:
            _info(args)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
