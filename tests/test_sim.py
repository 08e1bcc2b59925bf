"""noprop-sim: three virtual clients on Flower's simulation engine (Ray, loopback), two rounds on synthetic data:
every block is trained each round and the assembled chain is well above chance."""

from __future__ import annotations

import time

import pytest
from procs import Spawned, quiet_env, script, write_synthetic_npz

from noprop.checkpoint import load_checkpoint
from noprop.data import load_dataset
from noprop.io import read_jsonl

pytestmark = pytest.mark.sim  # noprop-sim on Flower's simulation engine (Ray)

T = 3


def test_sim_three_clients_two_rounds(tmp_path, request):
    npz = write_synthetic_npz(tmp_path / "task.npz")
    out = tmp_path / "out"
    start = time.monotonic()
    sim = Spawned([script("noprop-sim"), "--clients", "3", "--partition", "iid", "--rounds", "2",
                   "--num-cpus", "2", "--dataset", f"npz:{npz}", "--out", str(out), "--T", str(T),
                   "--channels", "8,16,16", "--hidden", "64", "--batch-size", "32", "--lr", "3e-3", "--dropout", "0",
                   "--local-epochs", "3", "--eval-limit", "0", "--client-threads", "1"],
                  tmp_path / "sim.log", quiet_env(tmp_path / "flwr-home"), cwd=tmp_path)
    request.addfinalizer(sim.cleanup)
    while sim.proc.poll() is None:  # watch the process tree (Ray's workers) while it runs
        if time.monotonic() - start > 300:
            pytest.fail(f"noprop-sim did not finish within 300s\n{sim.text()[-5000:]}")
        sim.snapshot()
        time.sleep(1.0)
    code = sim.proc.returncode
    log = sim.text()
    assert code == 0, log[-5000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2], log[-3000:]
    for r in records:
        assert {int(t) for t in r["block_l2"]} == set(range(1, T + 1)), r  # all blocks trained each round
        assert set(r["plan"]) == {str(t) for t in range(1, T + 1)}, r
        assert len(r["trained_by"]) == 3 and not r["failed"] and not r["rejected"], r
    test = load_dataset(f"npz:{npz}", "test")
    acc = (load_checkpoint(out / "checkpoint.pt").model().predict(test.x) == test.y).float().mean().item()
    print(f"sim: accuracy {acc:.3f} from the checkpoint")
    assert acc > 0.9, f"accuracy {acc:.3f} (chance 0.25; measured 1.00)\n{log[-3000:]}"
    assert "final accuracy" in log
    for name in ("accuracy.png", "ownership.png", "DONE.json"):
        assert (out / name).exists(), name
    deadline = time.monotonic() + 20
    while sim.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not sim.leftovers(), f"Ray/Flower processes outlived noprop-sim: {sim.leftovers()}"
    print(f"sim: {time.monotonic() - start:.0f}s")


def test_background_evaluation_scores_and_saves_each_rounds_own_model(tmp_path, request):
    """With --eval-in-background, round r is evaluated and checkpointed while round r+1 trains: the checkpoint of
    round r must hold round r's weights and its metrics line their score, not the next round's. On a task that is
    still learning, each checkpoint's chain, evaluated again here, must give exactly its round's recorded numbers."""
    from run_helpers import chain_numbers

    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=300, n_test=400)
    out = tmp_path / "out"
    from procs import run_sim_to_end

    run_sim_to_end(["--clients", "2", "--rounds", "3", "--num-cpus", "2", "--dataset", f"npz:{npz}", "--out",
                    str(out), "--T", str(T), "--channels", "4,8,8", "--hidden", "16", "--batch-size", "64",
                    "--lr", "1e-3", "--dropout", "0", "--min-local-steps", "0", "--head-steps", "20",
                    "--eval-limit", "0", "--client-threads", "1", "--eval-in-background"], tmp_path, request, 300)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["eval_in_background"] for r in records] == [True, True, False]
    test = load_dataset(f"npz:{npz}", "test")
    from noprop.checkpoint import previous_path

    for path, record in ((previous_path(out / "checkpoint.pt"), records[1]), (out / "checkpoint.pt", records[2])):
        ckpt = load_checkpoint(path)
        assert ckpt.extra["round"] == record["round"]
        assert chain_numbers(ckpt.model(), test) == (record["accuracy"], record["nearest_accuracy"]), record
    # and the run was still learning, so a checkpoint of another round would have given other numbers
    assert len({(r["accuracy"], r["nearest_accuracy"]) for r in records}) == 3, records
