"""The same command and seed give the same run (issue 28): Flower's simulation draws node ids at random, so the
plan, the nodes' seeds and the order replies are summed in must follow the nodes' stable names instead."""

from __future__ import annotations

import pytest
from procs import run_sim_to_end, write_synthetic_npz

from noprop.checkpoint import load_checkpoint
from noprop.io import read_jsonl
from noprop.records import state_digest, to_numpy_state

pytestmark = pytest.mark.sim


def run_twice(tmp_path, request, extra: list[str]) -> list[tuple[list[dict], str]]:
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=600, n_test=200)
    runs = []
    for i in (1, 2):
        out = tmp_path / f"run{i}"
        run_sim_to_end(["--clients", "4", "--partition", "dirichlet:0.5", "--rounds", "2", "--num-cpus", "2",
                        "--dataset", f"npz:{npz}", "--out", str(out), "--T", "3", "--channels", "4,8,8",
                        "--hidden", "16", "--batch-size", "32", "--local-epochs", "1", "--min-local-steps", "0",
                        "--head-steps", "20", "--eval-limit", "0", "--client-threads", "1", "--seed", "5", *extra],
                       tmp_path, request, 300, log_name=f"sim{i}.log")
        ckpt = load_checkpoint(out / "checkpoint.pt")
        runs.append((read_jsonl(out / "metrics.jsonl"), state_digest(to_numpy_state(ckpt.state_dict))))
    return runs


def named_plan(record: dict) -> dict[str, list[str]]:
    names = record["node_names"]
    return {t: sorted(names[str(n)] for n in owners) for t, owners in record["plan"].items()}


def test_two_block_ownership_runs_plan_seed_and_train_alike(tmp_path, request):
    (first, digest1), (second, digest2) = run_twice(tmp_path, request, [])
    assert [r["round"] for r in first] == [r["round"] for r in second] == [1, 2]
    for a, b in zip(first, second):
        assert sorted(a["node_names"].values()) == [f"partition-{i}-of-4" for i in range(4)]
        assert named_plan(a) == named_plan(b), (a["plan"], b["plan"])
        # the model each round started from, bit for bit: round 2's is round 1's training by every node's own seed
        assert a["model_in"] == b["model_in"]
        assert a["accuracy"] == b["accuracy"] and a["block_l2"] == b["block_l2"]
    assert digest1 == digest2  # the final checkpoint's weights, bit for bit


def test_two_fedavg_runs_train_alike(tmp_path, request):
    (first, digest1), (second, digest2) = run_twice(tmp_path, request, ["--method", "cnn"])
    for a, b in zip(first, second):
        assert sorted(a["node_names"].values()) == [f"partition-{i}-of-4" for i in range(4)]
        assert a["model_in"] == b["model_in"] and a["accuracy"] == b["accuracy"]
    assert digest1 == digest2
