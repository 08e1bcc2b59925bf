"""The one federation loop (server/run.py), in process: a FedAvg run gets the crash safety of a block-ownership run.

Both methods' rounds go through FederatedRun, so a one-network method also keeps the previous checkpoint, falls
back to it when the latest is torn, and evaluates round r in the background while round r+1 trains.
"""

from __future__ import annotations

import numpy as np
import pytest
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.checkpoint import load_checkpoint, previous_path
from noprop.federation import FederationConfig, FederationError
from noprop.io import read_jsonl
from noprop.records import record_to_arrays, state_digest, to_numpy_state
from noprop.server.run import FederatedRun

pytestmark = pytest.mark.sim  # the real run loop and ClientApp, in this process


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


# -- block ownership, in process: a metrics line lost after its checkpoint, and the shared tensors ---------------


class RecordingGrid(LocalGrid):
    """LocalGrid that keeps every train message and reply, per round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train: dict[int, list[tuple]] = {}

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        for msg, reply in zip(messages, replies, strict=True):
            if msg.metadata.message_type == "train":
                rnd = int(msg.content["config"]["round"])
                self.train.setdefault(rnd, []).append((msg, reply))
        return replies


def dt_federation(tmp_path, rounds: int, **settings) -> tuple[FederationConfig, RecordingGrid]:
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=600, n_test=100)
    cfg = FederationConfig(T=3, num_rounds=rounds, min_nodes=3, channels="4,8,8", hidden=16, dropout=0.0,
                           batch_size=64, min_local_steps=0, eval_limit=0, eval_in_background=False,
                           join_timeout=0.01, dataset=f"npz:{npz}", out=str(tmp_path / "out"), **settings)
    return cfg, RecordingGrid(npz, 3, cfg.to_run_config())


def test_a_metrics_line_lost_between_the_checkpoint_and_the_line_is_restored_on_resume(tmp_path):
    cfg, grid = dt_federation(tmp_path, rounds=2, head_steps=5)
    first = FederatedRun(grid, cfg, log=lambda line: None)
    first.run()
    lines = first.metrics_path.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    first.metrics_path.write_text(lines[0])  # the crash came after round 2's checkpoint, before its line
    saved = load_checkpoint(first.ckpt_path).extra["record"]
    assert saved["round"] == 2

    cfg.num_rounds, cfg.resume = 3, True
    logged: list[str] = []
    resumed = FederatedRun(grid, cfg, log=logged.append)
    assert any("resuming after round 2 from" in line for line in logged), logged
    on_disk = read_jsonl(resumed.metrics_path)  # written back before any round runs
    assert [r["round"] for r in on_disk] == [1, 2], on_disk
    assert on_disk[1] == saved and on_disk[1]["model_in"] == saved["model_in"]
    assert resumed.run()["rounds"] == 3
    records = read_jsonl(resumed.metrics_path)
    assert [r["round"] for r in records] == [1, 2, 3] and records[:2] == on_disk
    assert resumed.ownership[:2] == [records[0]["plan"], records[1]["plan"]]


def test_the_server_takes_the_aggregated_shared_embedding_and_head_and_sends_them_next_round(tmp_path):
    """The shared tensors after a round are the example-weighted mean of every node's reply (computed here by
    hand in float64), and the next round's messages carry them: not the server's old copy."""
    cfg, grid = dt_federation(tmp_path, rounds=2, embedding="learned:8", head_steps=0)
    fed = FederatedRun(grid, cfg, log=lambda line: None)
    start = record_to_arrays(fed.arrays)
    fed.run_round(1, first=True)
    fed.run_round(2)
    after = fed.strategy.global_state  # round 2's result; round 1's is what round 2's messages carry
    shared = [k for k in start if not k.startswith("blocks.")]
    assert "embedding.weight" in shared and any(k.startswith("head.") for k in shared), shared
    for rnd, result in ((1, [record_to_arrays(m.content["arrays"]) for m, _ in grid.train[2]]), (2, None)):
        pairs = grid.train[rnd]
        assert len(pairs) == 3, pairs
        weights = np.array([float(r.content["metrics"]["num-examples"]) for _, r in pairs])
        for key in shared:
            values = np.stack([record_to_arrays(r.content["arrays"])[key].astype(np.float64) for _, r in pairs])
            expected = np.tensordot(weights / weights.sum(), values, axes=1)
            sent = record_to_arrays(pairs[0][0].content["arrays"])[key]
            assert not np.allclose(expected, sent, rtol=0, atol=1e-6), f"round {rnd}: {key} did not train"
            if result is None:  # the server's state after the last round
                got = [after[key]]
            else:  # every node got the same, new copy in round 2
                got = [arrays[key] for arrays in result]
            for g in got:
                assert np.allclose(g, expected, rtol=1e-5, atol=1e-6), (rnd, key, float(np.abs(g - expected).max()))
    assert not np.array_equal(after["embedding.weight"], start["embedding.weight"])


# -- client evaluation (--client-eval), for every method ------------------------------------------------------


@pytest.mark.parametrize("method", ["cnn", "dt"])
def test_client_eval_is_each_nodes_accuracy_on_its_own_test_data_weighted_by_its_examples(tmp_path, method):
    """--client-eval asks the nodes to evaluate the round's model on their own test split: the run records the
    example-weighted mean of their accuracies, which equals the checkpointed model evaluated here on each node's
    split. A one-network method evaluates too (it used to send nothing and record nothing)."""
    import torch

    from noprop.client.handlers import local_data
    from noprop.methods import build_model
    from noprop.trainer import evaluate_accuracy

    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=120)
    cfg = FederationConfig(method=method, T=2, num_rounds=1, min_nodes=2, channels="4,8,8", hidden=16, dropout=0.0,
                           batch_size=64, min_local_steps=0, eval_limit=0, join_timeout=0.01, client_eval=True,
                           dataset=f"npz:{npz}", out=str(tmp_path / "out"))
    grid = LocalGrid(npz, 2, cfg.to_run_config())
    run = FederatedRun(grid, cfg, log=lambda line: None)
    run.run()
    record = read_jsonl(run.metrics_path)[-1]
    assert record["client_accuracy"] is not None, record
    ckpt = load_checkpoint(run.ckpt_path)
    model = build_model(method, ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    correct = total = 0.0
    for i in range(2):
        test = local_data(f"npz:{npz}", "", "test", i, 2, cfg.partition_type, cfg.seed)
        with torch.no_grad():
            correct += evaluate_accuracy(model, test, cfg.eval_mode, seed=cfg.seed) * len(test)
        total += len(test)
    assert total == 120
    assert record["client_accuracy"] == pytest.approx(correct / total, abs=1e-9)


# -- client sampling (--fraction-train, --min-train-nodes), for every method ---------------------------------------


@pytest.mark.parametrize("method", ["cnn", "dt"])
def test_a_sampled_round_trains_its_share_of_the_nodes_and_every_node_trains_over_a_cycle(tmp_path, method):
    """--fraction-train 0.5 of 4 nodes: 2 train each round (their replies are the ones aggregated), and over the
    2 rounds of a cycle every node trains once; the metrics line records the sample."""
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=80)
    cfg = FederationConfig(method=method, T=2, num_rounds=4, min_nodes=4, channels="4,8,8", hidden=16,
                           dropout=0.0, batch_size=64, min_local_steps=0, eval_limit=0, join_timeout=0.01,
                           fraction_train=0.5, dataset=f"npz:{npz}", out=str(tmp_path / "out"))
    grid = LocalGrid(npz, 4, cfg.to_run_config())
    run = FederatedRun(grid, cfg, log=lambda line: None)
    run.run()
    records = read_jsonl(run.metrics_path)
    trained = [tuple(r["trained_by"]) for r in records]
    assert all(len(t) == 2 for t in trained), trained
    assert [tuple(r["sampled"]) for r in records] == trained
    for cycle in (trained[:2], trained[2:]):
        assert sorted(n for t in cycle for n in t) == sorted(grid.get_node_ids()), trained
    assert trained[:2] == trained[2:]  # the same rotation, cycle after cycle


def test_a_dt_sample_too_small_to_hold_every_block_takes_the_next_nodes_of_the_cycle(tmp_path):
    """Nodes that hold 1 block each, T=3 and --fraction-train 0.25 of 4 nodes (1 node): the round takes 3 nodes,
    so every block is trained (none left uncovered)."""
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=80)
    cfg = FederationConfig(T=3, num_rounds=2, min_nodes=4, channels="4,8,8", hidden=16, dropout=0.0,
                           batch_size=64, min_local_steps=0, eval_limit=0, join_timeout=0.01, fraction_train=0.25,
                           dataset=f"npz:{npz}", out=str(tmp_path / "out"))
    grid = LocalGrid(npz, 4, cfg.to_run_config(), max_blocks=1)
    run = FederatedRun(grid, cfg, log=lambda line: None)
    run.run()
    for record in read_jsonl(run.metrics_path):
        assert len(record["trained_by"]) == 3 and record["uncovered"] == [], record
        assert sorted(int(t) for t in record["plan"]) == [1, 2, 3]
