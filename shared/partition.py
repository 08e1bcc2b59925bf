"""Partitioners: split a label array into per-client parts (iid, dirichlet:ALPHA, classes:K).

Each takes labels and a seed and returns sorted int64 index arrays that are disjoint and cover every example;
bad settings raise :class:`noprop.sources.DatasetError` with the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from noprop.sources import DatasetError

if TYPE_CHECKING:
    import torch

__all__ = ["class_partition", "dirichlet_partition", "iid_partition", "parse_partitioning", "partition"]

_DIRICHLET_MAX_TRIES = 100


def _labels_array(labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor; this module stays torch-free for the launchers' checks
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
