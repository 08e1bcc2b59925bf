"""Client sampling (noprop.sampling): how many train, who, and that the rotation is fair and reproducible."""

from __future__ import annotations

import pytest

from noprop.sampling import extend_until, rotation, sample_round, sample_size

NAMES = [f"client-{i:02d}" for i in range(10)]


@pytest.mark.parametrize(("n", "fraction", "minimum", "expected"), [
    (10, 1.0, 1, 10), (10, 0.5, 1, 5), (10, 0.1, 1, 1), (10, 0.1, 3, 3), (10, 0.25, 1, 3), (7, 0.3, 1, 3),
    (1000, 0.1, 2, 100), (3, 0.1, 5, 3), (0, 0.5, 2, 0),
])
def test_sample_size_is_ceil_of_the_fraction_at_least_the_minimum_at_most_all(n, fraction, minimum, expected):
    assert sample_size(n, fraction, minimum) == expected


def test_fraction_one_picks_every_node_every_round():
    for rnd in range(4):
        assert sample_round(NAMES, 1.0, 1, rnd, seed=3) == sorted(NAMES)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_every_node_trains_exactly_once_per_cycle_when_k_divides_n(fraction):
    k = sample_size(len(NAMES), fraction, 1)
    rounds = len(NAMES) // k
    for start in (0, rounds, 2 * rounds):  # any cycle of the run, not only the first
        picked = [name for rnd in range(start, start + rounds) for name in sample_round(NAMES, fraction, 1, rnd, 7)]
        assert sorted(picked) == sorted(NAMES)


def test_no_node_waits_longer_than_ceil_n_over_k_rounds_when_k_does_not_divide_n():
    names = [f"n{i}" for i in range(7)]
    k = sample_size(7, 0.3, 1)  # 3 of 7
    last: dict[str, int] = {}
    gaps = []
    for rnd in range(30):
        picked = sample_round(names, 0.3, 1, rnd, 1)
        assert len(picked) == k
        for name in picked:
            if name in last:
                gaps.append(rnd - last[name])
            last[name] = rnd
    assert set(last) == set(names)
    assert max(gaps) <= -(-7 // k)


def test_the_sample_depends_on_names_and_seed_not_on_the_order_nodes_are_listed():
    a = sample_round(NAMES, 0.3, 1, 2, seed=5)
    b = sample_round(list(reversed(NAMES)), 0.3, 1, 2, seed=5)
    assert a == b
    seeds = {tuple(sample_round(NAMES, 0.3, 1, 0, seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the seed moves the sample
    assert rotation(NAMES, 5) == rotation(list(reversed(NAMES)), 5)


def test_extend_until_adds_the_next_nodes_of_the_cycle_until_enough():
    picked = sample_round(NAMES, 0.2, 1, 0, seed=2)
    order = rotation(NAMES, 2)
    extended = extend_until(picked, NAMES, 2, lambda names: len(names) >= 5)
    assert len(extended) == 5 and set(picked) <= set(extended)
    nxt = order[(max(order.index(n) for n in picked) + 1) % len(order)]
    assert nxt in extended  # the cycle's next, not any node
    assert extend_until(picked, NAMES, 2, lambda names: True) == sorted(picked)
    assert extend_until(picked, NAMES, 2, lambda names: False) == sorted(NAMES)  # all in, and it stops
