"""Small shards (issue 10): 3 clients with 500 examples each of a 10-class task, 3 rounds, the federation's
defaults (only the blocks are narrowed for speed). The chain used to predict one class every round there (the head
started random and got a few averaged steps a round); it must be well above chance from round 1 on.

In process: the real run loop and ClientApp over tests/run_helpers.py's LocalGrid. Flower's simulation engine
only carries the messages, and tests/test_sim.py covers it."""

from __future__ import annotations

import numpy as np
import pytest
from run_helpers import LocalGrid
from synthetic import synthetic_arrays
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.checkpoint import load_checkpoint
from noprop.data import load_dataset
from noprop.federation import FederationConfig
from noprop.io import read_jsonl
from noprop.server.run import run_federation

pytestmark = pytest.mark.sim  # the real run loop and ClientApp, in this process
ROUNDS = 3

CLASSES = 10


def test_three_clients_of_500_examples_learn_from_round_one(tmp_path):
    x, y = synthetic_arrays(1500, num_classes=CLASSES, size=20, noise=0.5, seed=1)
    xt, yt = synthetic_arrays(500, num_classes=CLASSES, size=20, noise=0.5, seed=2)
    npz = tmp_path / "ten.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=xt, y_test=yt)
    out = tmp_path / "out"
    # the defaults but for the widths; plan_by_speed off as in noprop-sim (the clients share this process)
    cfg = FederationConfig(num_rounds=ROUNDS, min_nodes=3, channels="8,16,16", hidden=64, eval_limit=0,
                           plan_by_speed=False, join_timeout=0.01, dataset=f"npz:{npz}", out=str(out))
    lines: list[str] = []
    run_federation(LocalGrid(npz, 3, cfg.to_run_config()), cfg, log=lines.append)
    log = "\n".join(lines)
    records = read_jsonl(out / "metrics.jsonl")
    accuracy = [r["accuracy"] for r in records]
    assert len(accuracy) == ROUNDS, log[-3000:]
    assert min(accuracy) > 0.5, f"per-round accuracy {accuracy} (chance {1 / CLASSES})\n{log[-3000:]}"
    # the prediction is not one class: every class is recognised in the last round
    assert all(v is not None and v > 0.2 for v in records[-1]["class_accuracy"].values()), records[-1]
    test = load_dataset(f"npz:{npz}", "test")
    final = (load_checkpoint(out / "checkpoint.pt").model().predict(test.x) == test.y).float().mean().item()
    assert final > 0.8, f"final accuracy {final:.3f}"
    assert (out / "diagnostics.png").exists()
