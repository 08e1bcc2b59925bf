"""Which of the connected nodes train this round: client sampling, as Flower's fraction_train and min_train_nodes.

Flower's own strategies draw a fresh random sample each round, so a node may wait many rounds and two runs of one
seed train different nodes. Here the nodes are put in one seeded order for the run (by their stable names, never
by Flower's node ids), and round r takes the next k of that cycle: every node trains once every ceil(N / k)
rounds, no node waits longer than that (bounded staleness), all train equally often, and the same seed gives the
same sample in every run. A pure function: the strategies (NoProp-DT's and the FedAvg family) call it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def sample_size(n: int, fraction: float, minimum: int) -> int:
    """How many of n nodes train: ceil(fraction * n), at least minimum, at most n."""
    if n <= 0:
        return 0
    return min(n, max(minimum, math.ceil(fraction * n - 1e-9)))


def rotation(identities: Sequence[str], seed: int) -> list[str]:
    """The run's cycle of the nodes: their names sorted, then shuffled by the seed."""
    order = sorted(set(identities))
    random.Random(seed).shuffle(order)
    return order


def sample_round(identities: Sequence[str], fraction: float, minimum: int, round: int, seed: int = 0) -> list[str]:
    """The names that train in `round` (0-based): the round's window of k consecutive names in the seeded cycle.

    Windows follow one another around the cycle, so over ceil(N / k) rounds every node is picked (when k divides
    N, exactly once). fraction 1 (the default) picks every node, in name order.
    """
    order = rotation(identities, seed)
    k = sample_size(len(order), fraction, minimum)
    if k >= len(order):
        return sorted(order)
    start = (round * k) % len(order)
    return sorted(order[(start + i) % len(order)] for i in range(k))


def extend_until(picked: Sequence[str], identities: Sequence[str], seed: int, enough) -> list[str]:
    """`picked`, and then the next names of the cycle after them, until `enough(names)` holds (or all are in).

    NoProp-DT needs its sample to hold every block: a round of small nodes takes as many more as that needs.
    """
    names = list(picked)
    if enough(names):
        return sorted(names)
    order = rotation(identities, seed)
    chosen = set(names)
    last = max((order.index(n) for n in names if n in order), default=-1)
    for i in range(1, len(order) + 1):
        name = order[(last + i) % len(order)]
        if name not in chosen:
            names.append(name)
            chosen.add(name)
            if enough(names):
                break
    return sorted(names)
