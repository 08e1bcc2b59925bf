"""The same command and seed give the same run (issue 28): Flower draws node ids at random (in simulation every
run), so the plan, the nodes' seeds and the order replies are summed in must follow the nodes' stable names."""

from __future__ import annotations

import random

import pytest
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.federation import FederationConfig
from noprop.io import read_jsonl
from noprop.records import state_digest, to_numpy_state
from noprop.server.run import FederatedRun

pytestmark = pytest.mark.sim
FLAGS = {"T": 3, "channels": "4,8,8", "hidden": 16, "batch_size": 32, "min_local_steps": 0, "head_steps": 20,
         "eval_limit": 0, "seed": 5, "partition_type": "dirichlet:0.5"}


def named_plan(record: dict) -> dict[str, list[str]]:
    names = record["node_names"]
    return {t: sorted(names[str(n)] for n in owners) for t, owners in record["plan"].items()}


def in_process_run(tmp_path, node_ids: list[int], method: str) -> tuple[list[dict], str]:
    tmp_path.mkdir(parents=True)
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=600, n_test=200)
    cfg = FederationConfig(method=method, num_rounds=2, min_nodes=4, dataset=f"npz:{npz}", out=str(tmp_path / "out"),
                           eval_in_background=False, join_timeout=0.01, plan_by_speed=False, **FLAGS)
    fed = FederatedRun(LocalGrid(npz, 4, cfg.to_run_config(), node_ids=node_ids), cfg, log=lambda _: None)
    fed.run()
    return read_jsonl(fed.out / "metrics.jsonl"), state_digest(to_numpy_state(fed.model.state_dict()))


@pytest.mark.parametrize("method", ["dt", "cnn"])
def test_runs_whose_nodes_flower_numbers_differently_train_alike(tmp_path, method):
    """Four nodes under other random node ids, listed in another order: the same plan by name, the same model
    every round bit for bit, the same final weights."""
    rng = random.Random(method)
    ids_a = rng.sample(range(1, 2**40), 4)
    ids_b = sorted(rng.sample(range(1, 2**40), 4), reverse=True)
    (first, digest_a), (second, digest_b) = (in_process_run(tmp_path / "a", ids_a, method),
                                             in_process_run(tmp_path / "b", ids_b, method))
    for a, b in zip(first, second):
        assert sorted(a["node_names"].values()) == [f"partition-{i}-of-4" for i in range(4)]
        if method == "dt":
            assert named_plan(a) == named_plan(b), (a["plan"], b["plan"])
            assert a["block_l2"] == b["block_l2"]
        assert a["model_in"] == b["model_in"] and a["accuracy"] == b["accuracy"]
    assert digest_a == digest_b


