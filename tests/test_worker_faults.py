"""A node's warm worker SIGKILLed while it trains, in a real federation (noprop-server and three noprop-client
processes on loopback): the round does not wait for the round timeout, the node's blocks keep their weights that
round, and the same node trains again the next round on a fresh worker."""

from __future__ import annotations

import os
import re
import shutil
import signal

import numpy as np
import pytest
from procs import wait_for
from test_e2e import ROUNDS, Federation, npz  # noqa: F401 - fixture

from noprop.checkpoint import load_checkpoint
from noprop.client import worker
from noprop.server.aggregate import block_of_key

pytestmark = pytest.mark.e2e
ROUND_TIMEOUT = 300


def worker_folder(fed: Federation, i: int):
    found = list((fed.tmp / f"node{i}" / "noprop-workers").iterdir())
    assert len(found) == 1, found
    return found[0]


def test_worker_killed_while_training_fails_fast_keeps_blocks_and_comes_back(tmp_path, npz):  # noqa: F811
    fed = Federation(tmp_path, npz, rounds=ROUNDS, extra=["--round-timeout", str(ROUND_TIMEOUT), "--local-epochs",
                                                          "12"])
    try:
        wait_for(lambda: fed.metrics() or fed.server.proc.poll() is not None, 300, what="round 1's metrics line")
        assert fed.metrics(), fed.report()
        round1 = tmp_path / "round1.pt"
        shutil.copy(fed.out / "checkpoint.pt", round1)  # written before round 1's metrics line
        victim = fed.clients[0]
        wait_for(lambda: "round 2: training" in victim.text() or fed.server.proc.poll() is not None, 300,
                 interval=0.1, what="round 2's training on the victim")
        folder = worker_folder(fed, 0)
        first_pid = worker.read_pid(folder)
        assert worker._is_worker(first_pid) and "round 2: trained" not in victim.text(), victim.text()[-2000:]
        os.kill(first_pid, signal.SIGKILL)
        code = fed.wait_server(timeout=600)
        assert code == 0, fed.report()
    finally:
        fed.cleanup()
    r1, r2, r3 = fed.metrics()
    victim_node = int(re.search(r"SuperNode ID: (\d+)", victim.text()).group(1))
    # round 2: the victim failed at once (an error reply, not the timeout), the others' work counted
    assert r2["failed"] == [victim_node] and victim_node not in r2["trained_by"], r2
    # (a round that waited for the timeout would last ROUND_TIMEOUT at least; the margin below is load's)
    assert len(r2["trained_by"]) == 2 and r2["round_time_s"] < 0.8 * ROUND_TIMEOUT, r2
    assert "closed the connection before replying" in fed.server.text() + "".join(
        p.read_text(errors="replace") for p in (fed.out / ".flower").glob("run-*.log")), fed.report()
    # its blocks of round 2 kept their round-1 weights; the blocks the others trained moved
    lost = {int(t) for t, owners in r2["plan"].items() if victim_node in owners}
    assert lost, r2
    before = load_checkpoint(round1).state_dict
    after = load_checkpoint(fed.out / "checkpoint.prev.pt").state_dict  # round 2's
    assert load_checkpoint(fed.out / "checkpoint.prev.pt").extra["round"] == 2
    trained = {int(t) for t in r2["block_l2"]}
    assert trained and not trained & lost, r2
    moved = set()
    for key in before:
        t = block_of_key(key)
        if t is None:
            continue
        same = np.array_equal(before[key].numpy(), after[key].numpy())
        assert not (t in lost and not same), f"{key} of a block the dead worker owned changed"
        if not same:
            moved.add(t)
    assert moved == trained, (moved, trained)  # the others' blocks did train (the comparison can tell)
    # round 3: the same node (its SuperNode lived on) trains again, on a fresh worker
    assert victim_node in r3["trained_by"], r3
    second_pid = worker.read_pid(worker_folder(fed, 0))
    assert second_pid != first_pid, (first_pid, second_pid)
    assert victim.text().count("ready on") == 2, victim.text()[-3000:]
