"""The one federation loop (server/run.py), in process: a FedAvg run gets the crash safety of a block-ownership run.

Both methods' rounds go through FederatedRun, so a one-network method also keeps the previous checkpoint, falls
back to it when the latest is torn, and evaluates round r in the background while round r+1 trains.
"""

from __future__ import annotations

import pytest
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.checkpoint import load_checkpoint, previous_path
from noprop.federation import FederationConfig, FederationError
from noprop.io import read_jsonl
from noprop.records import state_digest, to_numpy_state
from noprop.server.run import FederatedRun


def test_a_fedavg_run_resumes_from_the_previous_checkpoint_when_the_latest_is_torn(tmp_path):
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=100)
    cfg = FederationConfig(method="cnn", num_rounds=2, min_nodes=2, channels="4,8,8", hidden=16, dropout=0.0,
                           batch_size=64, min_local_steps=0, eval_limit=0, join_timeout=0.01,
                           dataset=f"npz:{npz}", out=str(tmp_path / "out"))
    grid = LocalGrid(npz, 2, cfg.to_run_config())
    first = FederatedRun(grid, cfg, log=lambda line: None)
    assert first.run()["rounds"] == 2
    records = read_jsonl(first.metrics_path)
    assert [r["eval_in_background"] for r in records] == [True, False]  # the last round waits for its own
    assert all(set(r["trained_by"]) == set(grid.contexts) for r in records), records
    previous = load_checkpoint(previous_path(first.ckpt_path))
    assert previous.extra["round"] == 1 and load_checkpoint(first.ckpt_path).extra["round"] == 2
    data = first.ckpt_path.read_bytes()
    first.ckpt_path.write_bytes(data[: len(data) // 2])  # torn: a crash half-way through a copy, a full disk

    lines: list[str] = []
    cfg.num_rounds, cfg.resume = 3, True
    done = FederatedRun(grid, cfg, log=lines.append).run()
    assert any("WARNING" in line and "using the previous checkpoint" in line for line in lines), lines
    assert any("resuming after round 1 from" in line for line in lines), lines
    records = read_jsonl(first.metrics_path)
    assert [r["round"] for r in records] == [1, 2, 3] and done["rounds"] == 3
    assert records[1]["model_in"] == state_digest(to_numpy_state(previous.state_dict))  # continues from round 1
    assert load_checkpoint(first.ckpt_path).extra["round"] == 3
    cfg.hidden = 8  # another model: refused before any round, with the fix, and the checkpoint is kept
    with pytest.raises(FederationError, match=r"holds a cnn model of other settings than this run's: give the"):
        FederatedRun(grid, cfg, log=lines.append)
    assert load_checkpoint(first.ckpt_path).extra["round"] == 3
