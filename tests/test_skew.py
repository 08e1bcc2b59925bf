"""Against forgetting under label skew (issue 21): the classes a node reports in discovery, the plan that uses
them, and the coverage step that keeps an owner of few classes from overwriting a block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.client.handlers import held_classes
from noprop.federation import FederationConfig
from noprop.server.run import FederatedRun

T = 2


@pytest.mark.unit
def test_a_node_reports_the_classes_it_holds_not_their_counts():
    y = torch.tensor([0] * 500 + [3] * 480 + [7] * 19 + [9] * 1)  # 7 is 1.9% of 1000, 9 one example
    assert held_classes(y, 10) == [0, 3]
    assert held_classes(torch.arange(10).repeat(5), 10) == list(range(10))
    # 100 even classes (1% each) are all held: the bar is a fifth of an even share, not a fixed 2%
    assert held_classes(torch.arange(100).repeat(3), 100) == list(range(100))


def skewed_run(tmp_path, **kw) -> tuple[FederatedRun, LocalGrid]:
    """4 nodes of one class each (classes:1 of a 4-class task), T = 2: each block gets 2 owners a round."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=100)
    cfg = FederationConfig(T=T, num_rounds=2, min_nodes=4, channels="4,8,8", hidden=16, dropout=0.0, batch_size=64,
                           min_local_steps=0, head_steps=10, eval_limit=0, eval_in_background=False,
                           join_timeout=0.01, dataset=f"npz:{npz}", partition_type="classes:1",
                           out=str(tmp_path / "out"), **{"coverage_step": True, "label_aware": True, **kw})
    grid = LocalGrid(npz, 4, cfg.to_run_config())
    return FederatedRun(grid, cfg, log=lambda _: None), grid


def owners_classes(fed: FederatedRun, record: dict) -> dict[str, set[int]]:
    caps = fed.strategy.capacities
    return {t: set().union(*(caps[n].classes for n in owners)) for t, owners in record["plan"].items()}


@pytest.mark.sim
def test_discovery_carries_each_nodes_classes_and_the_plan_pairs_owners_that_differ(tmp_path):
    fed, _ = skewed_run(tmp_path)
    record = fed.run_round(1, first=True)
    assert sorted(c for cap in fed.strategy.capacities.values() for c in cap.classes) == [0, 1, 2, 3]
    assert all(len(cap.classes) == 1 for cap in fed.strategy.capacities.values())
    # two owners a block, one class each: together they must hold two classes, never one class twice
    assert all(len(c) == 2 for c in owners_classes(fed, record).values()), record["plan"]
    # a block's first owners take the full step; what they held is recorded for the next rounds' steps
    assert "block_step" not in record
    assert {t: len(c) for t, c in record["block_classes"].items()} == {"1": 2, "2": 2}


@pytest.mark.sim
def test_a_resumed_run_steps_as_the_uninterrupted_one(tmp_path):
    fed, grid = skewed_run(tmp_path)
    fed.run_round(1, first=True)
    resumed = FederatedRun(grid, FederationConfig(**{**fed.cfg.__dict__, "resume": True}), log=lambda _: None)
    assert resumed.strategy.block_classes == fed.strategy.block_classes and resumed.round == 1
    assert resumed.run_round(2)["block_step"] == {"1": 0.5, "2": 0.5}


@pytest.mark.sim
def test_the_coverage_step_keeps_half_of_what_a_block_had(tmp_path):
    """Two like runs; in round 2 one takes the coverage step and the other the owners' full mean (the same replies:
    the same seeds and start): the stepped block is exactly halfway between the block before and the full one."""
    steps = {}
    for step in (True, False):
        fed, _ = skewed_run(tmp_path / str(step))
        fed.run_round(1, first=True)
        before = {k: v.copy() for k, v in fed.strategy.global_state.items()}
        fed.strategy.cfg.coverage_step = step
        record = fed.run_round(2)
        steps[step] = (before, fed.strategy.global_state, record)
    (before, stepped, record), (before_full, full, record_full) = steps[True], steps[False]
    assert record["block_step"] == {"1": 0.5, "2": 0.5} and "block_step" not in record_full
    keys = [k for k in before if k.startswith("blocks.") and before[k].dtype == np.float32]
    assert all(np.array_equal(before[k], before_full[k]) for k in keys)  # alike up to round 2
    for k in keys:
        assert np.allclose(stepped[k], before[k] + 0.5 * (full[k] - before[k]), atol=1e-6), k
    assert any(not np.allclose(stepped[k], full[k]) for k in keys)
