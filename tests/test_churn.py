"""Nodes leaving a run, in process: the real federation loop (server/run.py) and the real ClientApp, joined by
a grid that hands each message straight to a node's app (no Flower processes: each test is a few seconds).

When the survivors cannot hold every block, the run goes on with the blocks they can hold; the others keep
their weights that round and come back into the plan in the next ones. Before the first round, too few slots
stay an error.
"""

from __future__ import annotations

import threading

import pytest
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.federation import FederationConfig, FederationError
from noprop.io import read_jsonl
from noprop.records import state_digest
from noprop.server.run import FederatedRun

pytestmark = pytest.mark.sim  # the real run loop and ClientApp, in this process

T = 3


def federation(tmp_path, max_blocks: int, rounds: int, min_nodes: int = 3, join_timeout: float = 0.01,
               rejoin_timeout: float = 30.0) -> tuple[FederatedRun, LocalGrid, list[str]]:
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=600, n_test=200)
    cfg = FederationConfig(T=T, num_rounds=rounds, min_nodes=min_nodes, channels="4,8,8", hidden=16, dropout=0.0,
                           batch_size=64, min_local_steps=0, head_steps=20, eval_limit=0, eval_in_background=False,
                           join_timeout=join_timeout, rejoin_timeout=rejoin_timeout, dataset=f"npz:{npz}",
                           out=str(tmp_path / "out"))
    grid = LocalGrid(npz, 3, cfg.to_run_config(), max_blocks=max_blocks)
    lines: list[str] = []
    return FederatedRun(grid, cfg, log=lines.append), grid, lines


def blocks_digest(fed: FederatedRun, t: int) -> str:
    return state_digest({k: v for k, v in fed.strategy.global_state.items() if k.startswith(f"blocks.{t}.")})


def test_survivors_that_cannot_hold_every_block_train_what_they_can_and_the_rest_keep_their_weights(tmp_path):
    fed, grid, lines = federation(tmp_path, max_blocks=1, rounds=4)
    first = fed.run_round(1, first=True)
    assert set(first["plan"]) == {"1", "2", "3"} and first["uncovered"] == [], first
    grid.gone.add(102)  # a node leaves: two nodes of one block each are left for three blocks
    held = {t: blocks_digest(fed, t) for t in range(1, T + 1)}
    records, uncovered_seen = [], set()
    for rnd in (2, 3, 4):
        record = fed.run_round(rnd)
        records.append(record)
        left_out = set(record["uncovered"])
        assert len(left_out) == 1 and set(record["plan"]) == {str(t) for t in range(1, T + 1)} - {str(*left_out)}
        assert set(record["trained_by"]) == {100, 101} and {int(t) for t in record["block_l2"]} | left_out == {1, 2, 3}
        for t in range(1, T + 1):  # the block left out keeps its weights, bit for bit; the others train
            now = blocks_digest(fed, t)
            assert (now == held[t]) == (t in left_out), (record["round"], t)
            held[t] = now
        uncovered_seen |= left_out
        assert any(f"round {record['round']}: " in line and "WARNING" in line and "block" in line for line in lines)
    assert len(uncovered_seen) >= 2, records  # the block left out moves on: none starves
    assert [r["round"] for r in read_jsonl(fed.out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert fed.finish()["rounds"] == 4 and (fed.out / "ownership.png").exists()  # the plot takes partial plans


def test_nodes_that_cannot_hold_every_block_before_the_first_round_are_an_error(tmp_path):
    fed, grid, _ = federation(tmp_path, max_blocks=1, rounds=2, min_nodes=2)
    grid.gone.add(102)
    with pytest.raises(FederationError, match=r"can hold 2 block\(s\) but T=3"):
        fed.run_round(1, first=True)
    assert not (fed.out / "metrics.jsonl").exists() and not (fed.out / "checkpoint.pt").exists()


@pytest.mark.parametrize("rejoin_timeout", [0.0, 60.0])
def test_a_later_round_waits_the_rejoin_timeout_for_a_node_to_come_back(tmp_path, rejoin_timeout):
    """Round 2 with one of the 3 nodes gone: with --rejoin-timeout 0 it goes on with the two left at once; with
    a minute's grace it waits, and the node that comes back (here after 1 s) trains in it."""
    fed, grid, lines = federation(tmp_path, max_blocks=0, rounds=2, join_timeout=600.0,
                                  rejoin_timeout=rejoin_timeout)
    fed.run_round(1, first=True)
    grid.gone.add(102)
    back = threading.Timer(1.0, grid.gone.discard, args=(102,))
    back.start()
    try:
        record = fed.run_round(2)
    finally:
        back.cancel()
    if rejoin_timeout:
        assert sorted(record["trained_by"]) == [100, 101, 102], record
        assert not any("going on with them" in line for line in lines), lines
    else:
        assert sorted(record["trained_by"]) == [100, 101], record
        assert any("only 2 of 3 nodes online; going on with them" in line for line in lines), lines


def test_the_first_round_waits_for_a_listed_node_until_it_answers_discovery(tmp_path):
    """A server restarted with the file database lists its clients as online before they have reconnected: a
    node that is listed but silent to its first two queries is still asked until it answers, and the round
    (here the first of the process, as after --resume) is planned with it."""
    fed, grid, lines = federation(tmp_path, max_blocks=0, rounds=1, join_timeout=600.0)
    grid.mute[102] = 2
    record = fed.run_round(1, first=True)
    assert grid.asked[102] == 3 and grid.asked[100] == 1, grid.asked
    assert 102 in {n for owners in record["plan"].values() for n in owners}, record
    assert sorted(record["trained_by"]) == [100, 101, 102], record
    assert any("waiting for nodes: 2/3" in line for line in lines), lines


def test_a_later_round_asks_a_silent_node_once_and_goes_on_without_it(tmp_path):
    """A node that stops answering fails its round's training; the next round asks it once and, past the
    rejoin timeout, goes on without it, not asking it again when the round is planned (that waits twice)."""
    fed, grid, lines = federation(tmp_path, max_blocks=0, rounds=3, join_timeout=600.0, rejoin_timeout=0.0)
    fed.run_round(1, first=True)
    grid.mute[102] = 10**6  # listed, never answers again
    assert fed.run_round(2)["failed"] == [102]
    asked = grid.asked[102]
    record = fed.run_round(3)
    assert grid.asked[102] - asked == 1, grid.asked
    assert sorted(record["trained_by"]) == [100, 101] and 102 not in record["node_names"], record
    assert any("only 2 of 3 nodes online; going on with them" in line for line in lines), lines
