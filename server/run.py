"""The federated run, for every method: wait for nodes, a strategy's round, evaluate, checkpoint, finish.

Each method names its round's Strategy in noprop.methods.METHODS: NoProp-DT's is BlockOwnershipStrategy
(server/block_strategy.py), where each node trains the blocks it owns; the one-network methods' is Flower's FedAvg
family with checked replies (server/fedavg.py). Every TRAIN message carries noprop.protocol.TrainInstructions.
Both go through this one loop, so both resume from the latest sound checkpoint (the previous one
if the latest is torn or corrupt), write the same metrics.jsonl lines, checkpoints and DONE.json, and evaluate
round r in the background while round r+1 trains (--eval-in-background).

Flower's Strategy.start is not used: it numbers rounds from 1 (a resumed run goes on at its own round, and the
nodes seed by it), evaluates between rounds on the critical path, and waits for nodes without a deadline.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from noprop.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_latest_checkpoint,
    previous_path,
    resume_mismatch,
    save_checkpoint,
)
from noprop.data import load_dataset
from noprop.federation import FederationConfig, FederationError
from noprop.io import append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from noprop.methods import build_model, load, method_named
from noprop.ops.report import round_line
from noprop.protocol import EvaluateInstructions, TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state, to_torch_state
from noprop.server.grid import PromptGrid
from noprop.server.timing import PhaseClock, reply_timeline

# NoProp-DT's readouts beside accuracy (which is the run's --readout)
DIAGNOSTICS = ("chain_accuracy", "ensemble_accuracy", "nearest_accuracy", "block_accuracy", "class_accuracy")


class RoundStrategy(Protocol):
    """What the run asks of a method's strategy (METHODS' `strategy` factory builds one): Flower's Strategy
    calls (configure_train, aggregate_train, configure_evaluate, aggregate_evaluate, summary), and these."""

    READY: str  # what a node must have done to count towards min_nodes ("connected", "answered discovery")
    round_record: dict  # after aggregate_train: the round's metrics.jsonl fields but evaluation and timing

    def describe(self) -> str: ...  # the round's shape, for the run's first line

    def ready_nodes(self, grid: Grid, nodes: list[int], rnd: int) -> list[int]: ...

    def plot_run(self, records: list[dict], out: Path) -> list[Path]: ...


class FederatedRun:
    """One run of `cfg` over `grid`, from round 1 or, with cfg.resume, after the last checkpointed round."""

    def __init__(self, grid: Grid, cfg: FederationConfig, log=print):
        self.grid, self.cfg, self.log = grid, cfg, log
        self.eval_data = load_dataset(cfg.dataset, split="test", root=cfg.data_root or None)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        self.model_cfg = cfg.model_config(self.eval_data.input_shape, self.eval_data.num_classes)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.method, self.model_cfg)
        self.round = 0  # the last completed round
        self.records: list[dict] = []
        self.ownership: list[dict] = []  # each completed block-ownership round's plan (block -> node ids)
        if cfg.resume and (self.ckpt_path.exists() or previous_path(self.ckpt_path).exists()):
            self.resume()
        else:
            if cfg.resume:
                self.log(f"no checkpoint in {self.out} to resume from: starting at round 1")
            self.metrics_path.unlink(missing_ok=True)
        self.arrays = arrays_to_record(to_numpy_state(self.model.state_dict()))
        self.clock = PhaseClock()  # the current round's; the strategy tells it where its phases end
        self.method = method_named(cfg.method)
        factory = load(self.method.strategy)
        self.strategy: RoundStrategy | Strategy = factory(cfg, self.model_cfg, self.model, log, self.records,
                                                          on_phase=self.lap)
        # what every node is told each round (the strategy adds the round, and NoProp-DT each node's blocks)
        self.train_config = TrainInstructions.for_run(cfg, self.model_cfg).to_record()
        self.evaluate_config = EvaluateInstructions(cfg.method, self.model_cfg, cfg.eval_mode, cfg.seed).to_record()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noprop-eval")  # rounds in order
        self.background: Future | None = None

    def resume(self) -> None:
        """Continue after the last round the checkpoint holds (the previous checkpoint if the latest is torn or
        corrupt); metrics lines of later rounds (written before the crash, not in the checkpoint) are dropped."""
        try:
            ckpt, path, note = load_latest_checkpoint(self.ckpt_path)
        except CheckpointError as exc:
            raise FederationError(str(exc)) from None
        if note:
            self.log(f"WARNING: {note}")
        if problem := resume_mismatch(ckpt, self.cfg.method, self.model_cfg):
            raise FederationError(f"{path} {problem}")
        self.model.load_state_dict(ckpt.state_dict)
        self.round = int(ckpt.extra["round"])
        self.ownership = list(ckpt.extra.get("ownership", []))
        records = read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
        self.records = [r for r in records if r.get("round", 0) <= self.round]
        last = ckpt.extra.get("record")  # the line is written just after the checkpoint: a crash between loses it
        if isinstance(last, dict) and (not self.records or self.records[-1].get("round") != last["round"]):
            self.records.append(last)
        if self.records != records:
            write_jsonl(self.metrics_path, self.records)
        self.log(f"resuming after round {self.round} from {path}")

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.log(f"noprop federation: {cfg.num_rounds} rounds of {self.strategy.describe()}, embedding "
                 f"{cfg.embedding}, evaluating on {self.eval_data.name} test "
                 f"({cfg.eval_limit or len(self.eval_data)} examples per round); output in {self.out}")
        self.strategy.summary()
        first_round = self.round + 1
        for rnd in range(first_round, cfg.num_rounds + 1):
            self.run_round(rnd, first=rnd == first_round)
        return self.finish()

    def run_round(self, rnd: int, first: bool = False) -> dict:
        """Round rnd: the strategy's messages out, its aggregate of the replies in; then evaluation, checkpoint and
        the metrics line, of a copy of the round's model, in the background while the next round trains (or now)."""
        self.clock = clock = PhaseClock()
        self.wait_for_nodes(first, clock, rnd)
        msgs = list(self.strategy.configure_train(rnd, self.arrays, self.train_config, self.grid))
        clock.lap("build_messages")
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout))
        clock.lap("wait_for_replies")
        arrays, _ = self.strategy.aggregate_train(rnd, replies)
        if arrays is not None:  # None: no reply passed its checks, the model stays as it was
            self.arrays = arrays
            self.model.load_state_dict(to_torch_state(record_to_arrays(arrays)))
        clock.lap("aggregate")
        record = self.strategy.round_record
        if isinstance(self.grid, PromptGrid):  # where each counted reply's time went, from the push to its arrival
            record["timeline"] = reply_timelines(replies, record["trained_by"], self.grid)
        if self.cfg.client_eval:
            record["client_accuracy"] = self.client_evaluate(rnd)
            clock.lap("client_evaluate")
        model = copy.deepcopy(self.model)
        self.wait_for_background()  # round r's line and checkpoint land before round r+1's, and errors surface
        if self.cfg.eval_in_background and rnd < self.cfg.num_rounds:
            self.background = self.executor.submit(self.conclude, rnd, record, model, clock)
        else:
            self.conclude(rnd, record, model, clock)
        return record

    def client_evaluate(self, rnd: int) -> float | None:
        msgs = list(self.strategy.configure_evaluate(rnd, self.arrays, ConfigRecord(dict(self.evaluate_config)),
                                                     self.grid))
        if not msgs:
            return None
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout)
        metrics = self.strategy.aggregate_evaluate(rnd, replies)
        return None if metrics is None else float(metrics["accuracy"])

    def wait_for_background(self) -> None:
        if self.background is not None:
            job, self.background = self.background, None
            job.result()

    def conclude(self, rnd: int, record: dict, model: torch.nn.Module, clock: PhaseClock) -> None:
        """Evaluate round rnd's model, checkpoint it and write its metrics line and round line."""
        critical_s = clock.total()  # the round as the next round sees it (in the background: it starts now)
        clock.last = time.perf_counter()
        record.update(self.evaluate(self.cfg.eval_limit, model))
        clock.lap("evaluate")
        self.round = rnd
        self.records.append(record)
        if "plan" in record:
            self.ownership.append(record["plan"])
        self.save(record, model)
        clock.lap("checkpoint")
        background = bool(self.cfg.eval_in_background and rnd < self.cfg.num_rounds)
        record["round_time_s"] = round(critical_s if background else clock.total(), 2)
        record["server_timing"] = clock.phases()
        record["eval_in_background"] = background
        append_jsonl(self.metrics_path, record)  # after the checkpoint: a resume drops lines past it anyway
        self.log(round_line(record, self.cfg.num_rounds))

    def wait_for_nodes(self, first: bool, clock: PhaseClock, rnd: int) -> None:
        """Wait for min_nodes nodes the strategy calls ready (ready_nodes: NoProp-DT's have answered discovery):
        the join timeout before this process's first round, the rejoin timeout (never longer) before later ones,
        then go on with the nodes there are."""
        later = min(self.cfg.rejoin_timeout, self.cfg.join_timeout)
        deadline = time.monotonic() + (self.cfg.join_timeout if first else later)
        announced = False
        while True:
            nodes = sorted(self.grid.get_node_ids())
            clock.lap("wait_for_nodes")
            if nodes:
                nodes = self.strategy.ready_nodes(self.grid, nodes, rnd)
                clock.lap("discovery")
            if len(nodes) >= self.cfg.min_nodes:
                return
            if time.monotonic() > deadline:
                if nodes and not first:
                    self.log(f"only {len(nodes)} of {self.cfg.min_nodes} nodes online; going on with them")
                    return
                raise FederationError(f"{len(nodes)} of the {self.cfg.min_nodes} required nodes "
                                      f"{self.strategy.READY} within {self.cfg.join_timeout:.0f}s: start more "
                                      "noprop-client processes or lower min-nodes")
            if not announced:
                self.log(f"waiting for nodes: {len(nodes)}/{self.cfg.min_nodes} connected")
                announced = True
            time.sleep(1.0)
            clock.lap("wait_for_nodes")

    def lap(self, phase: str) -> None:
        """A strategy's phase ended (its on_phase): on the current round's clock."""
        self.clock.lap(phase)

    # -- evaluation, checkpoint, the end -----------------------------------------------------------------------
    def evaluate(self, limit: int, model: torch.nn.Module | None = None) -> dict:
        """The accuracy of what predict gives; for NoProp-DT also every other readout (chain, ensemble, blocks)."""
        model = model or self.model
        data = self.eval_data if not limit else self.eval_data.subset(range(min(limit, len(self.eval_data))))
        return load(self.method.evaluator)(model, data, self.cfg.eval_mode, seed=self.cfg.seed)

    def save(self, record: dict, model: torch.nn.Module) -> None:
        save_checkpoint(self.ckpt_path, Checkpoint(
            method=self.cfg.method, config=self.model_cfg, state_dict=model.state_dict(),
            data=self.eval_data.describe(), metrics={"accuracy": record["accuracy"], "round": record["round"]},
            extra={"round": record["round"], "federation": self.cfg.to_run_config(),
                   "ownership": list(self.ownership), "record": record}), keep_previous=True)

    def finish(self) -> dict:
        self.wait_for_background()
        self.executor.shutdown()
        final = self.evaluate(self.cfg.final_eval_limit)
        n = self.cfg.final_eval_limit or len(self.eval_data)
        plots = self.strategy.plot_run(self.records, self.out)
        done = {"rounds": self.round, "accuracy": final["accuracy"], "eval_examples": n,
                "eval_mode": self.cfg.eval_mode, "checkpoint": str(self.ckpt_path), "method": self.cfg.method,
                **{k: final[k] for k in DIAGNOSTICS if k in final}}
        atomic_write_text(self.out / "DONE.json", json.dumps(done, indent=2))
        self.log(f"done: final accuracy {100 * final['accuracy']:.2f}% on {n} test examples ({self.cfg.eval_mode}); "
                 f"checkpoint {self.ckpt_path}, plots {', '.join(map(str, plots))}")
        return done


def reply_timelines(replies: list, nodes: list[int], grid: PromptGrid) -> dict[str, dict[str, float]]:
    """Each of `nodes`' reply's round trip in parts (server.timing.reply_timeline), from the grid's push and arrival
    clocks and the clocks the reply's metrics carry."""
    out = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if node in nodes and not msg.has_error() and "metrics" in msg.content:
            out[str(node)] = reply_timeline(dict(msg.content["metrics"]), grid.pushed_at,
                                            grid.arrived_at.get(msg.metadata.reply_to_message_id))
    return out


def run_federation(grid: Grid, cfg: FederationConfig, log=print) -> dict:
    return FederatedRun(grid, cfg, log).run()
