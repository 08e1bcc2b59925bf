"""Every noprop-sim run of the suite, on Flower's simulation engine (Ray, loopback), on synthetic data: three
virtual clients train every block each round to a chain well above chance; background evaluation scores each
round's own model; FedAvg of the CNN and of NoProp-FM (with a resume) through Flower's own strategy; the same
command twice gives the same run.

They live in this one module because `make test` spreads whole modules over its pytest-xdist workers: one
worker runs these one after another, one Ray cluster at a time (procs.one_simulation_at_a_time checks it)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from procs import Spawned, one_simulation_at_a_time, quiet_env, run_sim_to_end, script, write_synthetic_npz
from test_reproducible import named_plan

from noprop.checkpoint import load_checkpoint
from noprop.data import load_dataset
from noprop.io import read_jsonl
from noprop.records import arrays_to_record, state_digest, to_numpy_state

pytestmark = pytest.mark.sim  # noprop-sim on Flower's simulation engine (Ray)

T = 3


def test_sim_three_clients_two_rounds(tmp_path, request):
    npz = write_synthetic_npz(tmp_path / "task.npz")
    out = tmp_path / "out"
    one_simulation_at_a_time(request)
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
    from run_helpers import READOUT_KEYS, chain_numbers

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
        assert chain_numbers(ckpt.model(), test) == tuple(record[k] for k in READOUT_KEYS), record
    # and the run was still learning, so a checkpoint of another round would have given other numbers
    assert len({json.dumps([r[k] for k in READOUT_KEYS]) for r in records}) == 3, records


# -- one-network methods through Flower's own FedAvg (moved here from test_cnn.py and test_federated_methods.py)

def test_sim_runs_fedavg_of_the_cnn_for_two_rounds(tmp_path, request):
    """A real noprop-sim: two virtual clients, two rounds of Flower's FedAvg of the CNN (about 30 s here). Round 2
    is the one that once failed: FedAvg handed BatchNorm's integer num_batches_tracked back as float64, so every
    round-2 reply was rejected for its dtype and the model stopped learning."""
    npz = write_synthetic_npz(tmp_path / "task.npz")
    out = tmp_path / "out"
    log = run_sim_to_end(["--method", "cnn", "--clients", "2", "--partition", "iid", "--rounds", "2", "--num-cpus",
                          "2", "--dataset", f"npz:{npz}", "--out", str(out), "--channels", "8,16,16", "--hidden",
                          "32", "--batch-size", "32", "--lr", "3e-3", "--dropout", "0", "--local-epochs", "2",
                          "--eval-limit", "0", "--client-threads", "1"], tmp_path, request, 180)
    assert "FedAvg of one cnn network" in log, log[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2], records
    for record in records:
        assert len(record["trained_by"]) == 2 and not record["rejected"] and not record["failed"], record
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.method == "cnn" and ckpt.extra["round"] == 2
    assert ckpt.state_dict["features.13.num_batches_tracked"].dtype == torch.int64
    full_bytes = arrays_to_record(to_numpy_state(ckpt.state_dict)).count_bytes()
    assert set(record["bytes_to"].values()) == set(record["bytes_from"].values()) == {full_bytes}, record
    test = load_dataset(f"npz:{npz}", "test")
    acc = (ckpt.model().predict(test.x) == test.y).float().mean().item()
    assert acc > 0.9, f"accuracy {acc:.3f} (chance 0.25)\n{log[-3000:]}"
    assert json.loads((out / "DONE.json").read_text())["method"] == "cnn"


def run_fm_sim(tmp_path, request, out, npz_path, rounds: int, *extra: str) -> str:
    return run_sim_to_end(["--method", "fm", "--clients", "2", "--partition", "iid", "--rounds", str(rounds),
                           "--num-cpus", "2", "--dataset", f"npz:{npz_path}", "--out", str(out), "--steps", "5",
                           "--channels", "8,16,16", "--hidden", "64", "--batch-size", "32", "--lr", "3e-3",
                           "--dropout", "0", "--local-epochs", "3", "--eval-limit", "0", "--client-threads", "1",
                           *extra], tmp_path, request, 300, f"sim-{rounds}.log")


def test_sim_fedavg_of_noprop_fm_with_resume(tmp_path, request):
    """Round 1, stop, then --resume to round 2: FedAvg of the whole FM network, checked end to end."""
    npz_path = write_synthetic_npz(tmp_path / "task.npz")
    out = tmp_path / "out"
    run_fm_sim(tmp_path, request, out, npz_path, 1)
    first = load_checkpoint(out / "checkpoint.pt")
    assert first.extra["round"] == 1
    log = run_fm_sim(tmp_path, request, out, npz_path, 2, "--resume")
    assert "resuming after round 1" in log, log[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2], log[-3000:]
    # the resumed round 2 sent out round 1's checkpoint, bit for bit (the digest of the arrays FedAvg sent)
    assert records[1]["model_in"] == state_digest(to_numpy_state(first.state_dict)), records[1]
    assert records[0]["model_in"] != records[1]["model_in"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.method == "fm" and ckpt.config.steps == 5 and ckpt.extra["round"] == 2
    full_bytes = arrays_to_record(to_numpy_state(ckpt.state_dict)).count_bytes()
    for r in records:
        assert len(r["trained_by"]) == 2 and not r["rejected"] and not r["failed"], r
        assert set(r["bytes_to"].values()) == {full_bytes}, r  # every node gets the whole network
        assert set(r["bytes_from"].values()) == {full_bytes}, r
    test = load_dataset(f"npz:{npz_path}", "test")
    acc = (ckpt.model().predict(test.x) == test.y).float().mean().item()
    print(f"fm sim: accuracy {acc:.3f} from the checkpoint")
    assert acc > 0.9, f"accuracy {acc:.3f} (chance 0.25; measured 1.00)\n{log[-3000:]}"
    assert json.loads((out / "DONE.json").read_text())["method"] == "fm"
    assert (out / "accuracy.png").exists() and not (out / "ownership.png").exists()


# -- the same command twice gives the same run (issue 28; test_reproducible.py has the in-process half)

def test_two_simulations_of_one_command_train_alike(tmp_path, request):
    """The real thing: Ray's virtual clients, node ids drawn by Flower in each run, throughputs measured under
    contention (noprop-sim plans by data alone)."""
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=600, n_test=200)
    runs = []
    for i in (1, 2):
        out = tmp_path / f"run{i}"
        run_sim_to_end(["--clients", "4", "--partition", "dirichlet:0.5", "--rounds", "2", "--num-cpus", "2",
                        "--dataset", f"npz:{npz}", "--out", str(out), "--T", "3", "--channels", "4,8,8",
                        "--hidden", "16", "--batch-size", "32", "--local-epochs", "1", "--min-local-steps", "0",
                        "--head-steps", "20", "--eval-limit", "0", "--client-threads", "1", "--seed", "5"],
                       tmp_path, request, 300, log_name=f"sim{i}.log")
        ckpt = load_checkpoint(out / "checkpoint.pt")
        runs.append((read_jsonl(out / "metrics.jsonl"), state_digest(to_numpy_state(ckpt.state_dict))))
    (first, digest1), (second, digest2) = runs
    assert [r["round"] for r in first] == [r["round"] for r in second] == [1, 2]
    for a, b in zip(first, second):
        assert named_plan(a) == named_plan(b), (a["plan"], b["plan"])
        assert a["model_in"] == b["model_in"] and a["accuracy"] == b["accuracy"]
    assert digest1 == digest2
