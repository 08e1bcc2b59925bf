"""A federated NoProp run, round by round: discover, plan, train, check, aggregate, evaluate, checkpoint."""

from __future__ import annotations

import copy
import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from noprop.checkpoint import Checkpoint, CheckpointError, load_latest_checkpoint, previous_path, save_checkpoint
from noprop.data import load_dataset
from noprop.diagnostics import chain_diagnostics
from noprop.federation import FederationConfig
from noprop.io import append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from noprop.model import NoPropDT
from noprop.model_configs import parse_embedding
from noprop.plots import plot_chain_diagnostics, plot_federated_run
from noprop.records import arrays_to_record, record_to_arrays, state_digest, to_numpy_state, to_torch_state
from noprop.server.aggregate import Reply, aggregate, keys_for_blocks, validate_reply
from noprop.server.grid import PromptGrid
from noprop.server.planner import NodeCapacity, OwnershipPlan, PlanError, plan_ownership
from noprop.trainer import fit_head, node_seed


class FederationError(Exception):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    round: int = 0  # last completed round
    records: list[dict] = field(default_factory=list)
    capacities: dict[int, NodeCapacity] = field(default_factory=dict)
    ownership: list[dict] = field(default_factory=list)  # each completed round's plan (block -> node ids)


class NoPropFederation:
    def __init__(self, grid: Grid, cfg: FederationConfig, log=print):
        self.grid = grid
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        if parse_embedding(cfg.embedding)[0] == "prototype":
            raise FederationError("prototype embeddings need training images on the server; federated runs "
                                  "support one-hot and learned:D (set embedding accordingly)")
        self.eval_data = load_dataset(cfg.dataset, split="test", root=cfg.data_root or None)
        self.model_cfg = cfg.model_config(self.eval_data.input_shape, self.eval_data.num_classes)
        self.state = RunState()
        torch.manual_seed(cfg.seed)
        model = NoPropDT(self.model_cfg)
        if cfg.resume and (self.ckpt_path.exists() or previous_path(self.ckpt_path).exists()):
            self.resume(model)
        else:
            if cfg.resume:
                self.log(f"no checkpoint in {self.out} to resume from: starting at round 1")
            self.metrics_path.unlink(missing_ok=True)
        self.model = model
        self.global_state = to_numpy_state(model.state_dict())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noprop-eval")  # rounds in order
        self.background: Future | None = None
        self.model_cfg_json = json.dumps(self.model_cfg.to_dict())

    def resume(self, model: NoPropDT) -> None:
        """Continue after the last round the checkpoint holds (the previous checkpoint if the latest is torn or
        corrupt); metrics lines of later rounds (written before the crash, not in the checkpoint) are dropped."""
        try:
            ckpt, path, note = load_latest_checkpoint(self.ckpt_path)
        except CheckpointError as exc:
            raise FederationError(str(exc)) from None
        if note:
            self.log(f"WARNING: {note}")
        if ckpt.config != self.model_cfg:
            raise FederationError(f"{path} was trained with another model config: use a new --out or the original "
                                  "settings")
        model.load_state_dict(ckpt.state_dict)
        self.state.round = int(ckpt.extra["round"])
        self.state.ownership = list(ckpt.extra.get("ownership", []))
        records = read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
        self.state.records = [r for r in records if r.get("round", 0) <= self.state.round]
        last = ckpt.extra.get("record")  # the line is written just after the checkpoint: a crash between loses it
        if isinstance(last, dict) and (not self.state.records or self.state.records[-1].get("round") != last["round"]):
            self.state.records.append(last)
        if self.state.records != records:
            write_jsonl(self.metrics_path, self.state.records)
        self.log(f"resuming after round {self.state.round} from {path}")

    # -- the run -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.log(f"noprop federation: {cfg.num_rounds} rounds, T={cfg.T}, policy {cfg.policy}, "
                 f"embedding {cfg.embedding}, evaluating on {self.eval_data.name} test "
                 f"({cfg.eval_limit or len(self.eval_data)} examples per round); output in {self.out}")
        first_round = self.state.round + 1
        for rnd in range(first_round, cfg.num_rounds + 1):
            self.run_round(rnd, first=rnd == first_round)
        final = self.finish()
        return final

    def run_round(self, rnd: int, first: bool = False) -> dict:
        clock = PhaseClock()
        nodes = self.wait_for_nodes(first=first)
        clock.lap("wait_for_nodes")
        self.discover(nodes, rnd)
        clock.lap("discovery")
        live = [self.state.capacities[n] for n in nodes if n in self.state.capacities]
        if not live:
            raise FederationError("no node answered discovery: check the clients' logs")
        try:  # mid-run (a resumed run too), nodes that left must not end it: train the blocks the rest can hold
            plan = plan_ownership(live, self.cfg.T, rnd - 1, self.cfg.seed, self.cfg.policy, self.cfg.replicas,
                                  partial=rnd > 1)
        except PlanError as exc:
            raise FederationError(str(exc)) from None
        if plan.uncovered:
            self.log(f"WARNING: round {rnd}: the {len(live)} node(s) hold {len(plan.owners)} of {self.cfg.T} blocks; "
                     f"block(s) {', '.join(map(str, plan.uncovered))} keep their weights this round (start more "
                     "noprop-client processes or raise --max-blocks)")
        replies, record = self.train(plan, rnd, clock)  # only replies that passed validation
        self.global_state = aggregate(self.global_state, plan, replies, self.cfg.aggregation, self.cfg.trim_fraction)
        self.model.load_state_dict(to_torch_state(self.global_state))
        clock.lap("aggregate")
        if self.cfg.head_steps and replies:
            record["head_fit"] = self.fit_head(rnd)  # before the next round: the head goes out with the blocks
        clock.lap("head_fit")
        if self.cfg.client_eval:
            record["client_accuracy"] = self.client_evaluate(rnd)
            clock.lap("client_evaluate")
        record["nodes"] = nodes
        # evaluation, checkpoint and the metrics line, of a copy of this round's model: in the background while
        # the next round trains (--eval-in-background), or now
        model = copy.deepcopy(self.model)
        self.wait_for_background()  # round r's line and checkpoint land before round r+1's, and errors surface
        if self.cfg.eval_in_background and rnd < self.cfg.num_rounds:
            self.background = self.executor.submit(self.conclude, rnd, plan, record, model, clock)
        else:
            self.conclude(rnd, plan, record, model, clock)
        return record

    def wait_for_background(self) -> None:
        if self.background is not None:
            job, self.background = self.background, None
            job.result()

    def conclude(self, rnd: int, plan: OwnershipPlan, record: dict, model: NoPropDT, clock: PhaseClock) -> None:
        """Evaluate round rnd's model, checkpoint it and write its metrics line and round line."""
        critical_s = clock.total()  # the round as the next round sees it (in the background: it starts now)
        clock.last = time.perf_counter()
        record.update(self.diagnose(self.cfg.eval_limit, model))
        clock.lap("evaluate")
        self.state.round = rnd
        self.state.records.append(record)
        self.state.ownership.append(record["plan"])
        self.save(record, model)
        clock.lap("checkpoint")
        background = bool(self.cfg.eval_in_background and rnd < self.cfg.num_rounds)
        record["round_time_s"] = round(critical_s if background else clock.total(), 2)
        record["server_timing"] = clock.phases()
        record["eval_in_background"] = background
        append_jsonl(self.metrics_path, record)  # after the checkpoint: a resume drops lines past it anyway
        trained = sum(1 for t in plan.owners if any(n in plan.owners[t] for n in record["trained_by"]))
        rejected = f"  rejected from node(s) {', '.join(record['rejected'])}" if record["rejected"] else ""
        blocks = record["block_accuracy"]
        self.log(f"round {rnd}/{self.cfg.num_rounds}  accuracy {100 * record['accuracy']:.2f}%  "
                 f"(nearest embedding {100 * record['nearest_accuracy']:.1f}%, blocks "
                 f"{100 * min(blocks.values()):.0f}-{100 * max(blocks.values()):.0f}%)  "
                 f"nodes {len(record['trained_by'])}/{len(plan.assignments)}  blocks trained {trained}/{self.cfg.T}  "
                 f"mean denoising loss {record['mean_l2']:.4f}  {record['round_time_s']:.1f}s (slowest client's "
                 f"training {max(record['client_train_time_s'].values(), default=0.0):.1f}s){rejected}")

    def wait_for_nodes(self, first: bool) -> list[int]:
        """Wait for min_nodes (the whole join timeout before the first round, briefly after)."""
        deadline = time.monotonic() + (self.cfg.join_timeout if first else min(30.0, self.cfg.join_timeout))
        announced = False
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_nodes:
                return nodes
            if time.monotonic() > deadline:
                if nodes and not first:
                    self.log(f"only {len(nodes)} of {self.cfg.min_nodes} nodes online; going on with them")
                    return nodes
                raise FederationError(f"{len(nodes)} of the {self.cfg.min_nodes} required nodes connected within "
                                      f"{self.cfg.join_timeout:.0f}s: start more noprop-client processes or lower "
                                      "min-nodes")
            if not announced:
                self.log(f"waiting for nodes: {len(nodes)}/{self.cfg.min_nodes} connected")
                announced = True
            time.sleep(1.0)

    def discover(self, nodes: list[int], rnd: int) -> None:
        """Query nodes not yet known; forget nodes that are gone."""
        known = self.state.capacities
        for n in list(known):
            if n not in nodes:
                del known[n]
        new = [n for n in nodes if n not in known]
        if not new:
            return
        content = ConfigRecord({"model-config": self.model_cfg_json, "batch-size": self.cfg.batch_size})
        msgs = [Message(RecordDict({"config": content}), n, MessageType.QUERY, group_id=f"query-{rnd}")
                for n in new]
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        for msg in replies:
            # an error reply made by the SuperLink (node unavailable) comes from the SuperLink, not the node
            node = sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                self.log(f"node {node}: discovery failed: {msg.error.reason}")
                continue
            try:
                c = msg.content["capacity"]
                cap = NodeCapacity(node_id=node, max_blocks=int(c["max-blocks"]), throughput=float(c["throughput"]),
                                   num_examples=int(c["num-examples"]), device=str(c["device"]),
                                   memory_mb=float(c["memory-mb"]))
                if not (cap.max_blocks >= 1 and cap.num_examples >= 1 and math.isfinite(cap.throughput)
                        and cap.throughput > 0):
                    raise ValueError("max-blocks, num-examples and throughput must be positive")
            except Exception as exc:  # noqa: BLE001 - a malformed answer must not stop the run
                self.log(f"node {node}: discovery reply rejected: {type(exc).__name__}: {exc}")
                continue
            known[node] = cap
            self.log(f"node {node}: {c['device']}, {cap.num_examples} examples of {c.get('data', '?')}, "
                     f"{cap.throughput:.0f} samples/s per block, holds up to {cap.max_blocks} blocks")

    def train(self, plan: OwnershipPlan, rnd: int, clock: PhaseClock | None = None) -> tuple[list[Reply], dict]:
        """Send each node its blocks; return the replies that passed validation and the round's record."""
        clock = clock or PhaseClock()
        cfg = self.cfg
        model_in = state_digest(self.global_state)  # the model this round trains from (after a resume too)
        sent: dict[str, tuple[int, list[str]]] = {}  # message id -> (node, keys)
        msgs, bytes_to = [], {}
        for node, blocks in sorted(plan.assignments.items()):
            keys = keys_for_blocks(self.global_state, blocks)
            arrays = arrays_to_record(self.global_state, keys)
            config = ConfigRecord({
                "round": rnd, "blocks": list(blocks), "local-epochs": cfg.local_epochs, "lr": cfg.lr,
                "weight-decay": cfg.weight_decay, "batch-size": cfg.batch_size, "seed": node_seed(cfg.seed, rnd, node),
                "model-config": self.model_cfg_json, "logit-adjust": cfg.logit_adjust,
                "min-local-steps": cfg.min_local_steps, "split-local-data": cfg.split_local_data,
            })
            msg = Message(RecordDict({"arrays": arrays, "config": config}), node, MessageType.TRAIN,
                          group_id=f"train-{rnd}")
            msgs.append((msg, node, keys))
            bytes_to[str(node)] = arrays.count_bytes()
        clock.lap("build_messages")
        out = self.grid.send_and_receive([m for m, _, _ in msgs], timeout=cfg.round_timeout)
        clock.lap("wait_for_replies")
        for m, node, keys in msgs:
            sent[m.metadata.message_id] = (node, keys)
        replies, rejected, bytes_from, failed = [], {}, {}, []
        losses: dict[int, list[float]] = {}
        answered = set()
        for msg in out:
            node, keys = sent.get(msg.metadata.reply_to_message_id, (msg.metadata.src_node_id, None))
            answered.add(node)
            if msg.has_error():
                failed.append(node)
                self.log(f"node {node}: training failed: {msg.error.reason}")
                continue
            reply, problem = parse_train_reply(msg, node, plan.blocks_of(node))
            if reply is not None:
                bytes_from[str(node)] = msg.content["arrays"].count_bytes()
                cap = self.state.capacities.get(node)
                problem = validate_reply(reply, keys or [], self.global_state,
                                         max_examples=cap.num_examples if cap else None, expected_round=rnd,
                                         max_value_ratio=cfg.max_value_ratio)
            if problem:
                rejected[node] = problem
                self.log(f"node {node}: reply rejected: {problem}")
                continue
            metrics = reply.metrics
            replies.append(reply)
            for t in plan.blocks_of(node):
                losses.setdefault(t, []).append(float(metrics[f"l2-block-{t}"]))
        for _, node, _ in msgs:
            if node not in answered:
                failed.append(node)
                self.log(f"node {node}: no reply within {cfg.round_timeout:.0f}s; its blocks go to others next round")
        for node in failed:  # re-discover next round if it is still there
            self.state.capacities.pop(node, None)
        block_l2 = {str(t): sum(v) / len(v) for t, v in sorted(losses.items())}
        record = {
            "round": rnd, "model_in": model_in, "plan": plan.to_json()["owners"], "uncovered": list(plan.uncovered),
            "trained_by": sorted(r.node_id for r in replies),
            "rejected": {str(k): v for k, v in rejected.items()}, "failed": sorted(failed),
            "block_l2": block_l2, "mean_l2": sum(block_l2.values()) / max(len(block_l2), 1),
            "bytes_to": bytes_to, "bytes_from": bytes_from,
            "num_examples": {str(r.node_id): r.num_examples for r in replies},
            "client_train_time_s": {str(r.node_id): round(float(r.metrics.get("train-time-s", 0.0)), 2)
                                    for r in replies},
            "client_timing": {str(r.node_id): client_timing(r.metrics) for r in replies},
        }
        if isinstance(self.grid, PromptGrid):  # where each reply's time went, from the push to its arrival
            by_node = {node: mid for mid, (node, _) in sent.items()}
            record["timeline"] = {str(r.node_id): reply_timeline(r.metrics, self.grid.pushed_at,
                                                                 self.grid.arrived_at.get(by_node[r.node_id]))
                                  for r in replies if r.node_id in by_node}
        clock.lap("validate")
        return replies, record

    def fit_head(self, rnd: int) -> dict[str, float]:
        """Retrain the aggregated head on the server, class-balanced, from q(z_T | y): no images, as many steps as
        it needs, whatever the nodes' label mix (their averaged head saw a few dozen skewed steps each)."""
        parts = fit_head(self.model, self.cfg.head_steps, seed=node_seed(self.cfg.seed, rnd, 0))
        state = to_numpy_state(self.model.state_dict())
        for key in state:
            if key.startswith("head."):
                self.global_state[key] = state[key]
        return {k: round(v, 4) for k, v in parts.items()}

    def eval_subset(self, limit: int):
        return self.eval_data if not limit else self.eval_data.subset(range(min(limit, len(self.eval_data))))

    def diagnose(self, limit: int, model: NoPropDT | None = None) -> dict:
        """The head's accuracy (what predict gives) and every other readout of the chain (noprop.diagnostics)."""
        return chain_diagnostics(model or self.model, self.eval_subset(limit), self.cfg.eval_mode, seed=self.cfg.seed)

    def client_evaluate(self, rnd: int) -> float | None:
        nodes = [n for n, c in self.state.capacities.items() if c.max_blocks >= self.cfg.T]
        if not nodes:
            return None
        config = ConfigRecord({"model-config": self.model_cfg_json, "eval-mode": self.cfg.eval_mode})
        msgs = [Message(RecordDict({"arrays": arrays_to_record(self.global_state), "config": config}), n,
                        MessageType.EVALUATE, group_id=f"evaluate-{rnd}") for n in nodes]
        total, correct = 0, 0.0
        for msg in self.grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            if msg.has_error():
                continue
            m = msg.content["metrics"]
            total += int(m["num-examples"])
            correct += float(m["accuracy"]) * int(m["num-examples"])
        return correct / total if total else None

    def save(self, record: dict, model: NoPropDT | None = None) -> None:
        info = {"name": self.eval_data.name, "classes": list(self.eval_data.classes), "mean": list(self.eval_data.mean),
                "std": list(self.eval_data.std), "input_shape": list(self.eval_data.input_shape)}
        save_checkpoint(self.ckpt_path, Checkpoint(
            method="dt", config=self.model_cfg, state_dict=(model or self.model).state_dict(), data=info,
            metrics={"accuracy": record["accuracy"], "round": record["round"]},
            extra={"round": record["round"], "federation": self.cfg.to_run_config(),
                   "ownership": list(self.state.ownership), "record": record}), keep_previous=True)

    def finish(self) -> dict:
        self.wait_for_background()
        self.executor.shutdown()
        final = self.diagnose(self.cfg.final_eval_limit)
        final_acc = final["accuracy"]
        n = self.cfg.final_eval_limit or len(self.eval_data)
        plot_federated_run(self.state.records, self.out / "accuracy.png", self.out / "ownership.png")
        plot_chain_diagnostics(self.state.records, self.out / "diagnostics.png")
        done = {"rounds": self.state.round, "accuracy": final_acc, "eval_examples": n,
                "eval_mode": self.cfg.eval_mode, "checkpoint": str(self.ckpt_path),
                **{k: final[k] for k in ("nearest_accuracy", "block_accuracy", "class_accuracy")}}
        atomic_write_text(self.out / "DONE.json", json.dumps(done, indent=2))
        self.log(f"done: final accuracy {100 * final_acc:.2f}% on {n} test examples ({self.cfg.eval_mode}); "
                 f"checkpoint {self.ckpt_path}, plots {self.out / 'accuracy.png'}, {self.out / 'ownership.png'}, "
                 f"{self.out / 'diagnostics.png'}")
        return done


class PhaseClock:
    """Wall seconds of a round's phases, in the order they ran (metrics.jsonl: server_timing)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.parts[phase] = self.parts.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start

    def phases(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.parts.items()}


CLIENT_PHASES = ("time-to-handler-s", "time-worker-start-s", "time-imports-s", "time-data-s", "time-model-s",
                 "train-time-s", "time-reply-s", "time-relay-s")


def client_timing(metrics: dict) -> dict[str, float]:
    """The time parts a train reply reports (those of them it has), in seconds."""
    return {k[:-2].removeprefix("time-").replace("-", "_"): round(float(metrics[k]), 3)
            for k in CLIENT_PHASES if isinstance(metrics.get(k), int | float)}


def reply_timeline(metrics: dict, pushed_at: float, arrived_at: float | None) -> dict[str, float]:
    """A reply's round trip in parts (seconds): push -> the ClientApp process's start (the SuperNode's and
    SuperExec's polling), -> the ClientApp's import (Flower's start, the message pull, the app's install), -> the
    handler, the handler, and handler end -> arrival at the server (the push back, polling); cpu_process is that
    process's CPU seconds up to the handler's end. Parts the reply cannot tell (simulation: no process start) are
    left out."""
    points = [pushed_at, *(metrics.get(k) for k in ("clock-process-start", "clock-app-import", "clock-handler-start",
                                                    "clock-handler-end")), arrived_at]
    names = ("to_process", "to_app", "to_handler", "handler", "back")
    known = [(i, p) for i, p in enumerate(points) if isinstance(p, int | float)]
    parts = {}
    for (i, a), (j, b) in zip(known, known[1:]):
        parts["+".join(names[i:j])] = round(b - a, 3)
    if isinstance(metrics.get("cpu-process-s"), int | float):
        parts["cpu_process"] = round(float(metrics["cpu-process-s"]), 3)
    return parts


def parse_train_reply(msg: Message, node: int, blocks: tuple[int, ...]) -> tuple[Reply | None, str | None]:
    """A train reply's parts, or the reason it is malformed (a reply is the sender's word: never trust its layout)."""
    try:
        record = msg.content["arrays"]
        metrics = dict(msg.content["metrics"])
        arrays = record_to_arrays(record)
    except Exception as exc:  # noqa: BLE001 - missing or wrong records arrive in several exception types
        return None, f"malformed reply ({type(exc).__name__}: {exc})"
    num_examples = metrics.get("num-examples")
    stamp = metrics.get("round")
    missing = [f"l2-block-{t}" for t in blocks if not isinstance(metrics.get(f"l2-block-{t}"), int | float)]
    if missing:
        return None, f"malformed reply: metrics {', '.join(missing)} missing"
    reply = Reply(node_id=node, arrays=arrays, num_examples=num_examples,  # type: ignore[arg-type] - validated next
                  metrics=metrics, round=stamp if isinstance(stamp, int) else None)
    return reply, None


def main_loop(grid: Grid, cfg: FederationConfig, log=print) -> dict:
    return NoPropFederation(grid, cfg, log).run()
