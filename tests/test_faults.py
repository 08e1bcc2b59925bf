"""Faults injected into real federations (issue 6, items 3-5).

- One federation of real processes (noprop-server and three noprop-client on loopback, synthetic data) lives
  through, in order: a client SIGKILLed while it trains (round 2), a straggler whose whole process tree is
  SIGSTOPped while it trains (round 2, SIGCONT after the round), the killed client restarted with the same
  partition, and the server SIGKILLed while round 3 trains, then restarted with --resume. The tests below read
  that one history from different sides.
- A rogue node (tests/rogue_sim.py: noprop's ClientApp wrapped to tamper its train replies), in process over
  LocalGrid: every tampered reply is rejected by node id, the honest ones count, the run learns.
- Checkpoint rotation and fallback, and the new run settings as launcher flags, without a federation.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import Spawned, alive, cleanup_all, descendants, quiet_env, script, wait_for, write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_latest_checkpoint,
    previous_path,
    save_checkpoint,
)
from noprop.data import load_dataset
from noprop.federation import FederationConfig
from noprop.io import read_jsonl
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.ops.cli import LaunchError
from noprop.ops.network import free_port, port_free
from noprop.ops.run_flags import federation_config_from_args
from noprop.records import state_digest, to_numpy_state
from noprop.server.aggregate import Reply, aggregate
from noprop.server.planner import OwnershipPlan
from noprop.server.run import FederatedRun

TESTS = Path(__file__).parent
T = 3
NUM_CLIENTS = 3
ROUNDS = 3
ROUND_TIMEOUT = 45.0  # an honest reply took up to 17 s with make test's 3 workers on 2 cores
SMALL = ["--T", str(T), "--channels", "8,16,16", "--hidden", "64", "--batch-size", "32", "--lr", "3e-3",
         "--dropout", "0", "--local-epochs", "3", "--eval-limit", "0", "--client-threads", "1"]
ALIVE, STRAGGLER, VICTIM = 0, 1, 2  # client indices (= partitions)


# -- checkpoints: previous kept, torn latest detected, both bad is one clear error ------------------------------

MODEL = NoPropConfig(input_shape=(1, 12, 12), num_classes=4, T=2, channels=(4, 8, 8), hidden=16, dropout=0.0)


def checkpoint_of_round(rnd: int) -> Checkpoint:
    torch.manual_seed(rnd)
    return Checkpoint(method="dt", config=MODEL, state_dict=NoPropDT(MODEL).state_dict(), extra={"round": rnd})


def test_checkpoint_keeps_the_previous_one_and_falls_back_to_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for rnd in (1, 2, 3):
        save_checkpoint(path, checkpoint_of_round(rnd), keep_previous=True)
    assert load_checkpoint(path).extra["round"] == 3 and load_checkpoint(previous_path(path)).extra["round"] == 2
    ckpt, used, note = load_latest_checkpoint(path)
    assert (ckpt.extra["round"], used, note) == (3, path, None)

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn: a crash half-way through a non-atomic copy, a full disk
    ckpt, used, note = load_latest_checkpoint(path)
    assert ckpt.extra["round"] == 2 and used == previous_path(path)
    assert "not a readable noprop-fl checkpoint" in note and "using the previous checkpoint" in note

    # a corrupt latest is not rotated over the good previous one: the next save keeps round 2 as previous
    save_checkpoint(path, checkpoint_of_round(4), keep_previous=True)
    assert load_checkpoint(previous_path(path)).extra["round"] == 2 and load_checkpoint(path).extra["round"] == 4

    path.write_bytes(flip_payload_bit(path.read_bytes()))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
    prev = previous_path(path)
    prev.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_latest_checkpoint(path)
    message = str(err.value)
    assert message.startswith("no usable checkpoint:") and "\n" not in message
    assert f"{path} fails its checksum" in message and f"{prev} is not a readable" in message, message
    assert "start again" in message


def flip_payload_bit(data: bytes) -> bytes:
    """The checkpoint with one bit flipped in the middle of its payload (the pickled model, most of it tensor
    bytes), where the file stays a readable zip: only the checksum can tell. The payload is a bytes object that
    torch's pickle stores as latin-1 text in UTF-8, so the flipped byte is an ASCII one between ASCII ones."""
    body = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["payload"]
    stored = body.decode("latin-1").encode("utf-8")
    start = data.find(stored)
    assert start > 0 and data.count(stored) == 1, "the payload must be stored once, as latin-1 text in UTF-8"
    i = start + len(stored) // 2
    while max(data[i - 1 : i + 2]) >= 0x80:
        i += 1
    flipped = bytearray(data)
    flipped[i] ^= 0x01
    loaded = torch.load(io.BytesIO(bytes(flipped)), map_location="cpu", weights_only=True)
    assert loaded["payload"] != body and len(loaded["payload"]) == len(body)  # the zip and the pickle still read
    return bytes(flipped)


@pytest.mark.e2e
def test_resume_with_both_checkpoints_bad_is_one_line_exit_2(tmp_path):
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=200, n_test=50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80torn")
    (out / "checkpoint.prev.pt").write_bytes(b"")
    fleet, control = free_port(), free_port()
    res = subprocess.run([script("noprop-server"), "--insecure", "--resume", "--dataset", f"npz:{npz}",
                          "--out", str(out),
                          "--port", str(fleet), "--control-port", str(control), *SMALL],
                         capture_output=True, text=True, env=quiet_env(), timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("noprop-server: error: --resume: no usable checkpoint"), lines[0]


# -- the new run settings are launcher flags (generated from FederationConfig) ---------------------------------


@pytest.mark.parametrize("module", ["noprop.ops.server_cli", "noprop.ops.sim"])
def test_robust_aggregation_settings_are_flags(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    args = parser.parse_args(["--aggregation", "trimmed-mean", "--trim-fraction", "0.25", "--max-value-ratio", "20"])
    cfg, _ = federation_config_from_args(args, resolve_paths=False)
    assert (cfg.aggregation, cfg.trim_fraction, cfg.max_value_ratio) == ("trimmed-mean", 0.25, 20.0)
    assert cfg.to_run_config()["max-value-ratio"] == 20.0  # and they travel as Flower run config
    with pytest.raises(LaunchError, match=r"aggregation='max': use one of mean, median, trimmed-mean"):
        federation_config_from_args(parser.parse_args(["--aggregation", "max"]), resolve_paths=False)
    with pytest.raises(LaunchError, match=r"trim-fraction=0.5: must be at least 0 and below 0.5"):
        federation_config_from_args(parser.parse_args(["--trim-fraction", "0.5"]), resolve_paths=False)


# -- a rogue node ---------------------------------------------------------------------------------------------


def rogue_federation(tmp_path: Path, npz: Path, variant: str) -> tuple[Path, list[str]]:
    """tests/rogue_sim.py's federation in this process: the real run loop (server/run.py, as the ServerApp runs
    it) and the rogue-wrapped ClientApp over LocalGrid, with no Flower simulation engine (Ray) to start. Its output
    folder and the server's log lines."""
    from rogue_sim import NUM_NODES, SETTINGS, VARIANTS, make_rogue_client_app

    out = tmp_path / "out"
    overrides = {**SETTINGS, **VARIANTS[variant], "out": str(out), "dataset": f"npz:{npz}", "join-timeout": 1}
    cfg = FederationConfig.from_run_config(overrides)
    grid = LocalGrid(npz, NUM_NODES, cfg.to_run_config())
    grid.app = make_rogue_client_app(overrides, out / "rogue.jsonl")
    lines: list[str] = []
    FederatedRun(grid, cfg, log=lines.append).run()
    return out, lines


@pytest.mark.sim
@pytest.mark.parametrize("variant", ["median-rotate", "mean-replicate"])
def test_rogue_node_replies_are_rejected_by_node_id_and_the_run_learns(tmp_path, variant):
    """Every tampered reply is rejected by node id, and the model after each round is exactly the honest nodes'
    aggregate (rebuilt here from every node's recorded message and reply): under mean with a second owner per
    block, a tampered reply that got through would move it."""
    from rogue_sim import NUM_NODES, TAMPERS, VARIANTS

    npz = write_synthetic_npz(tmp_path / "task.npz")
    start = time.monotonic()
    out, lines = rogue_federation(tmp_path, npz, variant)
    log = "\n".join(lines)
    assert (out / "DONE.json").exists(), log[-5000:]
    tampered = read_jsonl(out / "rogue.jsonl")
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, len(TAMPERS) + 1)), records
    assert [t["tamper"] for t in tampered] == list(TAMPERS), tampered  # one tampered reply per round, each kind
    rogue = {t["node"] for t in tampered}
    assert len(rogue) == 1
    rogue_id = rogue.pop()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    settings = ckpt.extra["federation"]
    assert {k: settings[k] for k in VARIANTS[variant]} == VARIANTS[variant], settings  # the run was the variant
    reasons = {"foreign-block": "holds block(s) it was not given", "stale-round": "not the current round",
               "huge-count": "exceeds the", "out-of-range": "beyond the bound"}
    final_digest = state_digest(to_numpy_state(ckpt.state_dict))
    for t, record in zip(tampered, records, strict=True):
        assert t["round"] == record["round"]
        assert set(record["rejected"]) == {str(rogue_id)}, record  # rejected, by node id, in metrics.jsonl
        assert reasons[t["tamper"]] in record["rejected"][str(rogue_id)], (t, record["rejected"])
        assert f"node {rogue_id}: reply rejected: {record['rejected'][str(rogue_id)]}" in log  # and on the console
        honest = set(record["nodes"]) - {rogue_id}
        assert len(honest) == NUM_NODES - 1 and set(record["trained_by"]) == honest, record  # honest updates count
        assert set(record["num_examples"]) == {str(n) for n in honest}
        owned_by_honest = {int(b) for b, owners in record["plan"].items() if set(owners) & honest}
        assert {int(b) for b in record["block_l2"]} == owned_by_honest, record
        # the model after the round is the honest replies' aggregate, bit for bit: the next round's starting
        # digest, or the final checkpoint's
        before, plan, replies = rebuild_round(out, record)
        assert state_digest(before) == record["model_in"], "the recorded messages must hold the whole model"
        expected = aggregate(before, plan, [replies[n] for n in sorted(honest)], settings["aggregation"],
                             settings["trim-fraction"])
        after = records[record["round"]]["model_in"] if record["round"] < len(records) else final_digest
        # computed apart from the function under test: the rule itself, not only its reproduction, is checked
        actual = (rebuild_round(out, records[record["round"]])[0] if record["round"] < len(records)
                  else to_numpy_state(ckpt.state_dict))
        far = far_from(aggregate_by_hand(before, record, replies, settings["aggregation"]), actual)
        assert not far, (t, far)
        assert state_digest(expected) == after, (t, differing_keys(expected, out, record, records, ckpt))
        assert state_digest(expected) != record["model_in"]  # the round moved the model
        if t["tamper"] != "foreign-block":  # the aggregate with the rogue's reply would be another model
            with_rogue = aggregate(before, plan, [replies[n] for n in sorted(replies)], settings["aggregation"],
                                   settings["trim-fraction"])
            assert state_digest(with_rogue) != after, t
    test = load_dataset(f"npz:{npz}", "test")
    acc = (ckpt.model().predict(test.x) == test.y).float().mean().item()
    assert acc > 0.9, f"accuracy {acc:.3f} (chance 0.25; measured 1.00): the run learns from the honest nodes"
    print(f"rogue federation ({variant}): {time.monotonic() - start:.0f}s, final accuracy {acc:.3f}")


def traffic(out: Path, rnd: int, node: int, direction: str) -> tuple[dict[str, np.ndarray], int]:
    """What rogue_sim recorded of a node's train message ("in") or reply ("out"), and the reply's example count."""
    with np.load(out / "traffic" / f"r{rnd}-n{node}-{direction}.npz") as f:
        return {k: f[k] for k in f.files if k != "~num-examples"}, int(f["~num-examples"])


def rebuild_round(out: Path, record: dict) -> tuple[dict[str, np.ndarray], OwnershipPlan, dict[int, Reply]]:
    """The global model at the round's start (every node's message together), its plan, and every reply."""
    rnd, before, replies = record["round"], {}, {}
    for node in record["nodes"]:
        sent, _ = traffic(out, rnd, node, "in")
        for key, value in sent.items():  # the shared tensors went to every node alike
            assert key not in before or np.array_equal(before[key], value), key
            before[key] = value
        arrays, count = traffic(out, rnd, node, "out")
        replies[node] = Reply(node_id=node, arrays=arrays, num_examples=count, round=rnd)
    owners = {int(b): tuple(o) for b, o in record["plan"].items()}
    return before, OwnershipPlan(round=rnd - 1, policy="", owners=owners), replies


def differing_keys(expected: dict, out: Path, record: dict, records: list[dict], ckpt: Checkpoint) -> list[str]:
    """For a failure message: the tensors where the run's model after the round differs from the expectation."""
    if record["round"] < len(records):
        actual, _, _ = rebuild_round(out, records[record["round"]])
    else:
        actual = to_numpy_state(ckpt.state_dict)
    return sorted(k for k in expected if not np.array_equal(expected[k], actual[k]))


def aggregate_by_hand(before: dict[str, np.ndarray], record: dict, replies: dict[int, Reply],
                      method: str) -> dict[str, np.ndarray]:
    """The honest replies' aggregate computed here in float64, apart from noprop.server.aggregate: a block is the
    example-weighted mean of its honest owners' replies (BatchNorm's running_var pooled, E[var + mean^2] -
    mean^2), a shared tensor the example-weighted mean (mean) or the coordinate-wise median (median) of every
    honest reply; a block no honest node owned keeps its weights; integers rounded."""
    honest = set(record["trained_by"])
    out = {}
    for key, value in before.items():
        if key.startswith("blocks."):
            nodes = [n for n in record["plan"].get(key.split(".")[1], []) if n in honest]
        else:
            nodes = sorted(honest)
        if not nodes:
            out[key] = value
            continue
        stack = np.stack([replies[n].arrays[key].astype(np.float64) for n in nodes])
        w = np.array([replies[n].num_examples for n in nodes], np.float64)
        w /= w.sum()
        if not key.startswith("blocks.") and method == "median":
            new = np.median(stack, axis=0)
        elif key.endswith("running_var"):
            means = np.stack([replies[n].arrays[key.removesuffix("var") + "mean"].astype(np.float64) for n in nodes])
            new = np.tensordot(w, stack + means**2, axes=1) - np.tensordot(w, means, axes=1) ** 2
        else:
            new = np.tensordot(w, stack, axes=1)
        out[key] = np.rint(new) if np.issubdtype(value.dtype, np.integer) else new
    return out


def far_from(by_hand: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> list[str]:
    """The keys where the run's model after a round is not the hand-computed aggregate (float32 rounding aside)."""
    assert set(by_hand) == set(actual), sorted(set(by_hand) ^ set(actual))
    return sorted(k for k in by_hand if not np.allclose(actual[k].astype(np.float64), by_hand[k], rtol=1e-5,
                                                         atol=1e-6))


# -- crashes, a straggler and a server restart in one federation of real processes ------------------------------


def two_ports() -> tuple[int, int]:
    fleet = free_port()
    control = free_port()
    while control == fleet:
        control = free_port()
    return fleet, control


def line_in(spawned: Spawned, text: str) -> bool:
    return text in spawned.text()


def tree(spawned: Spawned) -> set[int]:
    return descendants(spawned.pid) | {spawned.pid}


def signal_tree(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class FaultyRun:
    tmp: Path
    npz: Path
    out: Path
    fleet: int
    control: int
    server: Spawned | None = None
    clients: list[Spawned] = field(default_factory=list)
    restarted: Spawned | None = None  # the victim, started again
    resumed: Spawned | None = None  # the server, started again with --resume
    events: dict = field(default_factory=dict)

    def server_cmd(self, *extra: str) -> list[str]:
        return [script("noprop-server"), "--insecure", "--port", str(self.fleet), "--control-port", str(self.control),
                "--rounds", str(ROUNDS), "--min-clients", str(NUM_CLIENTS), "--dataset", f"npz:{self.npz}",
                "--out", str(self.out), "--round-timeout", str(ROUND_TIMEOUT), *SMALL, *extra]

    def client(self, i: int, name: str) -> Spawned:
        return Spawned([script("noprop-client"), "--insecure", "--server", f"127.0.0.1:{self.fleet}",
                        "--data", f"npz:{self.npz}",
                        "--partition", f"{i}/{NUM_CLIENTS}", "--threads", "1", "--wait", "180",
                        "--state-dir", str(self.tmp / f"node{i}")],
                       self.tmp / f"{name}.log", quiet_env(self.tmp / f"node{i}"), cwd=self.tmp)

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    def all(self) -> list[Spawned]:
        return [p for p in (*self.clients, self.restarted, self.server, self.resumed) if p]

    def report(self) -> str:
        parts = [f"events: {json.dumps(self.events)}"]
        for name, p in (("server", self.server), ("resumed server", self.resumed)):
            if p:
                parts.append(f"--- {name} ---\n{p.text()[-3000:]}")
        for log in sorted((self.out / ".flower").glob("run-*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
        for p in (*self.clients, self.restarted):
            if p:
                parts.append(f"--- {p.log.name} ---\n{p.text()[-1500:]}")
        return "\n".join(parts)


def keep_checkpoint(run: FaultyRun, rnd: int) -> None:
    """Copy the checkpoint the round just wrote (before its metrics line; the next one comes a round later), for
    the tests to compare weights across rounds: the run itself keeps only the last two."""
    shutil.copy2(run.out / "checkpoint.pt", run.tmp / f"checkpoint-round{rnd}.pt")


def kept_checkpoint(run: FaultyRun, rnd: int) -> Checkpoint:
    ckpt = load_checkpoint(run.tmp / f"checkpoint-round{rnd}.pt")
    assert ckpt.extra["round"] == rnd, ckpt.extra["round"]
    return ckpt


def digest(ckpt: Checkpoint) -> str:
    return state_digest(to_numpy_state(ckpt.state_dict))


def watch(run: FaultyRun, check, timeout: float, what: str):
    try:
        return wait_for(check, timeout, interval=0.1, what=what)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{run.report()}")


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> FaultyRun:
    tmp = tmp_path_factory.mktemp("faults")
    npz = write_synthetic_npz(tmp / "task.npz", n_train=2400)  # 800 examples a client: a few seconds of training
    fleet, control = two_ports()
    run = FaultyRun(tmp=tmp, npz=npz, out=tmp / "out", fleet=fleet, control=control)
    start = time.monotonic()
    try:
        run.server = Spawned(run.server_cmd(), tmp / "server.log", quiet_env(), cwd=tmp)
        run.clients = [run.client(i, f"client{i}") for i in range(NUM_CLIENTS)]
        straggler, victim = run.clients[STRAGGLER], run.clients[VICTIM]
        watch(run, lambda: run.metrics(), 400, "round 1's metrics line")
        keep_checkpoint(run, 1)

        # round 2: the victim dies and the straggler freezes, each while it trains
        pending = {VICTIM, STRAGGLER}
        while pending:
            watch(run, lambda: any(line_in(run.clients[i], "round 2: training") for i in pending), 300,
                  "round 2's training on the victim and the straggler")
            if VICTIM in pending and line_in(victim, "round 2: training"):
                victim.kill_tree(signal.SIGKILL)
                run.events["victim_killed"] = time.monotonic() - start
                pending.discard(VICTIM)
            if STRAGGLER in pending and line_in(straggler, "round 2: training"):
                straggler.snapshot()
                run.events["straggler_tree"] = sorted(tree(straggler))
                signal_tree(tree(straggler), signal.SIGSTOP)
                run.events["straggler_stopped"] = time.monotonic() - start
                pending.discard(STRAGGLER)
        run.restarted = run.client(VICTIM, "client2-restarted")  # same partition, a new process
        watch(run, lambda: len(run.metrics()) >= 2, ROUND_TIMEOUT + 240, "round 2's metrics line")
        keep_checkpoint(run, 2)
        run.events["straggler_log_at_cont"] = len(straggler.text())
        signal_tree(set(run.events["straggler_tree"]) | tree(straggler), signal.SIGCONT)
        run.events["straggler_continued"] = time.monotonic() - start

        # round 3: once the restarted client trains, SIGKILL the server launcher (only it: the rest must follow)
        watch(run, lambda: line_in(run.restarted, "round 3: training"), 400, "the restarted client training round 3")
        server_tree = tree(run.server)
        run.events["server_tree"] = sorted(server_tree)
        run.server.proc.kill()
        killed = time.monotonic()
        run.events["server_killed"] = killed - start
        # without PR_SET_PDEATHSIG they would live on: the deadline only leaves a loaded machine room
        watch(run, lambda: not any(alive(p) for p in server_tree), 180, "every process of the killed server gone")
        run.events["server_tree_gone_s"] = round(time.monotonic() - killed, 1)
        run.events["ports_free"] = port_free("127.0.0.1", fleet) and port_free("127.0.0.1", control)
        run.events["metrics_at_kill"] = run.metrics()
        run.resumed = Spawned(run.server_cmd("--resume"), tmp / "server-resumed.log", quiet_env(), cwd=tmp)
        deadline = time.monotonic() + 600
        while run.resumed.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the resumed server did not finish\n{run.report()}")
            for p in run.all():
                p.snapshot()
            time.sleep(1.0)
        run.events["total_s"] = round(time.monotonic() - start, 1)
        shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in run.events.items()
                 if k not in ("straggler_tree", "server_tree", "metrics_at_kill")}
        print(f"\nfaulty federation: {json.dumps(shown)}")
        yield run
    finally:
        for p in run.clients:  # a straggler left stopped would ignore SIGTERM
            signal_tree(tree(p), signal.SIGCONT)
        cleanup_all(run.all())


def node_ids(record: dict) -> set[int]:
    return set(record["nodes"])


def owners_of(record: dict) -> set[int]:
    return {n for owners in record["plan"].values() for n in owners}


def trained_in(spawned: Spawned, rnd: int) -> float | None:
    """The training time the client printed for a round, None if it never finished it."""
    m = re.search(rf"round {rnd}: trained in ([0-9.]+)s", spawned.text())
    return float(m.group(1)) if m else None


@pytest.mark.e2e
def test_client_killed_while_training_costs_only_its_own_work(faulty_run):
    run = faulty_run
    assert run.resumed.proc.returncode == 0, run.report()
    r1, r2, r3 = run.metrics()
    assert len(node_ids(r1)) == NUM_CLIENTS and owners_of(r1) == node_ids(r1), r1
    gone = set(r2["failed"]) - owners_of(r3)  # the victim: failed in round 2 and planned out after it
    assert len(gone) == 1 and gone < owners_of(r2), (r2, r3)
    victim = gone.pop()
    assert "round 2: training" in run.clients[VICTIM].text() and trained_in(run.clients[VICTIM], 2) is None, \
        "the kill must land while the victim trains"
    # the survivor's update counted; the two faulty nodes' did not
    assert len(r2["trained_by"]) == 1 and set(r2["failed"]) == owners_of(r2) - set(r2["trained_by"]), r2
    assert len(r2["failed"]) == 2 and not r2["rejected"], r2
    trained_blocks = {int(b) for b in r2["block_l2"]}
    assert trained_blocks == {int(b) for b, o in r2["plan"].items() if set(o) & set(r2["trained_by"])}, r2
    # the failed owners' blocks kept their weights, bit for bit (BatchNorm buffers too); the survivor's moved
    kept = {int(b) for b, o in r2["plan"].items() if set(o) <= set(r2["failed"])}
    assert len(kept) == 2 and kept.isdisjoint(trained_blocks), r2
    before, after = kept_checkpoint(run, 1).state_dict, kept_checkpoint(run, 2).state_dict
    assert r2["model_in"] == state_digest(to_numpy_state(before)), "round 2 must start from round 1's model"
    for t in range(1, T + 1):
        keys = [k for k in before if k.startswith(f"blocks.{t}.")]
        unchanged = [k for k in keys if torch.equal(before[k], after[k])]
        if t in kept:
            assert unchanged == keys, (t, sorted(set(keys) - set(unchanged)))
        else:
            assert not any(before[k].is_floating_point() for k in unchanged), (t, unchanged)
    # round 3: the dead node is planned out, every block has an owner, the run finishes
    assert victim not in r3["nodes"] and set(r3["plan"]) == {str(t) for t in range(1, T + 1)}, r3
    assert (run.out / "DONE.json").exists()


@pytest.mark.e2e
def test_straggler_does_not_hold_the_round_and_its_late_reply_never_counts(faulty_run):
    run = faulty_run
    r1, r2, r3 = run.metrics()
    text = run.clients[STRAGGLER].text()
    at_cont = run.events["straggler_log_at_cont"]
    stopped_for = run.events["straggler_continued"] - run.events["straggler_stopped"]
    # frozen mid-training: round 2 started, not finished, when the round ended ...
    assert "round 2: training" in text[:at_cont] and "round 2: trained" not in text[:at_cont], text[-3000:]
    # it finished training after SIGCONT (its warm worker was stopped with it, and the late reply below needs the
    # handler's end): its clock shows the stop
    late_training = trained_in(run.clients[STRAGGLER], 2)
    assert late_training is not None and late_training >= stopped_for - 5, (late_training, stopped_for, text[-3000:])
    # ... and the round ended while it was still stopped: the test wakes it only after round 2's metrics line, so a
    # server that waited for it would never have written that line and the fixture would fail at its deadline (no
    # bound on the round's time here: load stretches it)
    straggler = next(n for n in r2["failed"] if n in owners_of(r1) and n in owners_of(r3))
    # the server gave up on it at --round-timeout at the latest (Flower may drop it sooner, when its heartbeats
    # stop): the wait for round 2's replies is bounded by the timeout, not by the stop
    waited = r2["server_timing"]["wait_for_replies"]
    assert waited <= ROUND_TIMEOUT + 5, (waited, stopped_for, r2["server_timing"])
    assert straggler not in r2["trained_by"] and str(straggler) not in r2["num_examples"], r2
    # woken up, its SuperNode sends a late round-2 reply (nothing was logged while it was stopped), which the
    # server no longer reads ...
    after = text[at_cont:]
    assert "ROUND train-2]" in after and "Sending: train message" in after.split("ROUND train-3]")[0], after[:3000]
    # ... and it trains round 3 from a fresh message; nothing was rejected as stale: the late reply was never read
    assert straggler in r3["trained_by"] and not r3["rejected"], r3


@pytest.mark.e2e
def test_restarted_client_joins_again_and_gets_blocks(faulty_run):
    run = faulty_run
    r1, r2, r3 = run.metrics()
    text = run.restarted.text()
    # it registered as a new node and the server sent it blocks of round 3 (before the server was killed) ...
    got = re.findall(r"round 3: training block\(s\) ([0-9, ]+) on", text)
    assert got and re.search(r"round 3: trained in", text), run.report()
    assert re.search(r"SuperNode ID: (\d+)", text).group(1) not in {str(n) for n in node_ids(r1)}, text[:3000]
    # ... and after the server restart it was one of the three nodes the resumed round 3 waited for: it trained it
    restarted = int(re.search(r"SuperNode ID: (\d+)", text).group(1))
    assert owners_of(r3) - node_ids(r1) == {restarted} and restarted in r3["trained_by"], \
        (restarted, {k: r3.get(k) for k in ("nodes", "plan", "trained_by", "failed", "server_timing")}, run.report())


@pytest.mark.e2e
def test_server_killed_mid_run_resumes_with_history_and_accuracy(faulty_run):
    run = faulty_run
    ev = run.events
    # SIGKILL of noprop-server alone took its SuperLink, SuperExec, ServerApp and log stream down, ports freed
    assert len(ev["server_tree"]) >= 4, ev
    assert ev["ports_free"], ev  # gone (within the fixture's deadline: server_tree_gone_s), and the ports with them
    assert run.resumed.proc.returncode == 0, run.report()
    run_logs = "".join(p.read_text(errors="replace") for p in (run.out / ".flower").glob("run-*.log"))
    assert "resuming after round 2 from" in run_logs, run.report()
    before = ev["metrics_at_kill"]
    assert [r["round"] for r in before] == [1, 2], before  # killed during round 3
    records = run.metrics()
    assert [r["round"] for r in records] == [1, 2, 3], records  # continued from the last completed round, once
    assert records[:2] == before  # history kept as it was
    for rnd in (1, 2):  # ... and it is the history of the rounds the checkpoints hold, not lines made up after
        saved = json.loads(json.dumps(kept_checkpoint(run, rnd).extra["record"]))
        assert {k: records[rnd - 1][k] for k in saved} == saved, (rnd, saved, records[rnd - 1])
    ckpt = load_checkpoint(run.out / "checkpoint.pt")
    assert ckpt.extra["round"] == ROUNDS
    assert ckpt.extra["ownership"][:2] == [r["plan"] for r in before]  # the same ownership history
    assert ckpt.extra["ownership"][2] == records[2]["plan"]
    previous = load_checkpoint(previous_path(run.out / "checkpoint.pt"))
    assert previous.extra["round"] == 2
    # the resumed round 3 trained from round 2's checkpoint, bit for bit (the digest of the server's model state
    # when it built round 3's messages), and that checkpoint is the one written before the kill
    assert records[2]["model_in"] == digest(previous) == digest(kept_checkpoint(run, 2)), records[2]
    # clients survived the server restart: the first client's launcher never stopped, and trained after it
    assert run.clients[ALIVE].proc.poll() is None
    first = next(iter(owners_of(records[0]) & owners_of(records[2]) & set(records[2]["trained_by"])), None)
    assert first is not None, records
    # the resumed run ends with a working model (chance is 0.25). Not asserted: "as good as an uninterrupted run".
    # A noprop-sim of the same settings started alongside gave 1.00 against the resumed run's 1.00 in one run and
    # 0.83 in another (the faulty run also loses two clients' round-2 work, and on this tiny task one round can
    # swing the accuracy by 17 points), so one seed cannot tell "within noise" apart from a small loss.
    test = load_dataset(f"npz:{run.npz}", "test")
    resumed_acc = (ckpt.model().predict(test.x) == test.y).float().mean().item()
    print(f"final accuracy after the resume: {resumed_acc:.3f}")
    assert resumed_acc > 0.8, (resumed_acc, records)
