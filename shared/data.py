"""Loading a dataset into memory, normalised: LabelledData, load_dataset and load_train_test.

Every dataset is loaded once into memory as tensors (:class:`LabelledData`): all the datasets we support
fit, and it makes batching many blocks over many epochs cheap (no per-sample decode or collate).

Sources (the ``name`` of :func:`load_dataset`; the readers are in :mod:`noprop.data_formats`):

- ``fashion-mnist`` (the default, real data), ``mnist``, ``cifar10``, ``cifar100``: read through
  torchvision's dataset classes from a local folder (``root``); ``download=True`` fetches them
  (:mod:`noprop.fetch`).
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

Failures are :class:`noprop.sources.DatasetError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from noprop.data_formats import _load_builtin, _load_imagefolder, _load_npz, _Raw
from noprop.sources import DATASETS, SPLITS, DatasetError, _builtin_key, _root

__all__ = ["LabelledData", "load_dataset", "load_train_test"]

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

    def check_fits(self, model_cfg) -> None:
        """Raise ValueError unless a model of `model_cfg` (any method's config: input_shape, num_classes) reads this
        data: a node started on other data than the run's must say so, not train on it."""
        if tuple(self.input_shape) != tuple(model_cfg.input_shape) or self.num_classes != model_cfg.num_classes:
            raise ValueError(f"this node's data {self.name} has input {tuple(self.input_shape)} and {self.num_classes}"
                             f" classes, the run's model expects {tuple(model_cfg.input_shape)} and "
                             f"{model_cfg.num_classes}: point --data at the same kind of data as the server's")

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


def _valid_names() -> str:
    return ", ".join(DATASETS) + ", imagefolder:PATH, npz:PATH"


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

    ``name``: one of :data:`noprop.sources.DATASETS`, ``imagefolder:PATH`` or ``npz:PATH`` (see the module
    docstring). Sources without their own test split get a seeded, class-stratified 20% holdout as the test
    split (fixed seed :data:`noprop.data_formats.HOLDOUT_SEED`, independent of a run's seed). Statistics come
    from the train split; for ``split="test"`` pass ``normalise_with=train_data``, else the train split is
    read to compute them.
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
