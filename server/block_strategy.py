"""NoProp-DT's round as a Flower Strategy: each node trains only the blocks it owns.

configure_train asks new nodes what they can hold (a QUERY message), plans ownership for the round and sends
each node its blocks with the shared embedding and head; aggregate_train checks every reply and combines each
block from its owners and the shared tensors from all, then retrains the head on the server. configure_evaluate
sends the assembled chain to the nodes that can hold it all, if the run asks for client evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from noprop.federation import FederationConfig, FederationError
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.plots import plot_chain_diagnostics, plot_federated_run
from noprop.protocol import QueryInstructions, TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, state_digest, to_numpy_state, to_torch_state
from noprop.sampling import extend_until, sample_round
from noprop.server.aggregate import Expected, Reply, aggregate, check_replies, keys_for_blocks
from noprop.server.planner import NodeCapacity, OwnershipPlan, PlanError, plan_ownership
from noprop.server.timing import client_timing
from noprop.trainer import fit_head, node_seed


class BlockOwnershipStrategy(Strategy):
    """Block ownership over Flower's Grid. `model` is the run's NoPropDT: the head is fitted on it after each
    aggregation. After aggregate_train, `round_record` holds the round's metrics.jsonl fields but evaluation and
    timing.
    history: the metrics lines of the rounds done before (a resumed run)."""

    def __init__(self, cfg: FederationConfig, model_cfg: NoPropConfig, model: NoPropDT, log=print,
                 history: list[dict] | None = None, on_phase: Callable[[str], None] = lambda phase: None):
        self.cfg, self.model_cfg, self.model, self.log = cfg, model_cfg, model, log
        self.on_phase = on_phase  # told as each of the round's phases ends (the run's PhaseClock.lap)
        # block t -> the classes its owners have held so far (the coverage step); a resumed run reads its last round
        last = (history or [{}])[-1]
        self.block_classes: dict[int, set[int]] = {int(t): set(c) for t, c in last.get("block_classes", {}).items()}
        self.capacities: dict[int, NodeCapacity] = {}  # nodes that answered discovery and have not failed since
        self.silent_in: dict[int, int] = {}  # node -> the round whose discovery it did not answer
        self.global_state: dict = {}
        self.plan: OwnershipPlan | None = None
        self.pending: list[tuple[Message, int, list[str]]] = []  # this round's messages, their nodes and keys
        self.grid: Grid | None = None
        self.round_record: dict = {}

    def describe(self) -> str:
        """The round's shape, for the run's first line."""
        return f"block ownership, T={self.cfg.T}, policy {self.cfg.policy}"

    def plot_run(self, records: list[dict], out: Path) -> list[Path]:
        """Accuracy per round, who owned which block, and the readouts per round."""
        plots = [out / "accuracy.png", out / "ownership.png", out / "diagnostics.png"]
        plot_chain_diagnostics(records, plots[2])
        plot_federated_run(records, plots[0], plots[1])
        return plots

    def summary(self) -> None:
        self.log(f"block ownership: T={self.cfg.T}, policy {self.cfg.policy}"
                 + (f" ({self.cfg.replicas} owners per block)" if self.cfg.policy == "replicate" else "")
                 + f", {self.cfg.aggregation} of the shared embedding and head")

    # -- training --------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Discover, plan (only the blocks the nodes can hold, after round 1), and address each node its blocks."""
        cfg, rnd = self.cfg, server_round
        self.grid = grid
        self.global_state = record_to_arrays(arrays)
        nodes = sorted(grid.get_node_ids())
        self.discover(nodes, rnd)
        self.on_phase("discovery")
        live = [self.capacities[n] for n in nodes if n in self.capacities]
        if not cfg.label_aware:
            live = [replace(c, classes=frozenset()) for c in live]
        if not live:
            raise FederationError("no node answered discovery: check the clients' logs")
        live = self.sampled(live, rnd)
        try:  # mid-run (a resumed run too), nodes that left must not end it: train the blocks the rest can hold
            plan = plan_ownership(live, cfg.T, rnd - 1, cfg.seed, cfg.policy, cfg.replicas, partial=rnd > 1,
                                  by_speed=cfg.plan_by_speed)
        except PlanError as exc:
            raise FederationError(str(exc)) from None
        if plan.uncovered:
            self.log(f"WARNING: round {rnd}: the {len(live)} node(s) hold {len(plan.owners)} of {cfg.T} blocks; "
                     f"block(s) {', '.join(map(str, plan.uncovered))} keep their weights this round (start more "
                     "noprop-client processes or raise --max-blocks)")
        self.plan = plan
        instructions = TrainInstructions.from_record(config)
        msgs, bytes_to = [], {}
        for node, blocks in sorted(plan.assignments.items()):
            keys = keys_for_blocks(self.global_state, blocks)
            record = arrays_to_record(self.global_state, keys)
            # the name it is planned under: the node seeds its round by it (unique here, when two nodes clash)
            node_config = instructions.for_node(rnd, blocks, self.capacities[node].identity).to_record()
            msg = Message(RecordDict({"arrays": record, "config": node_config}), node, MessageType.TRAIN,
                          group_id=f"train-{rnd}")
            msgs.append((msg, node, keys))
            bytes_to[str(node)] = record.count_bytes()
        self.round_record = {"round": rnd, "model_in": state_digest(self.global_state), "nodes": nodes,
                             "sampled": sorted(c.node_id for c in live),
                             "plan": plan.to_json()["owners"], "uncovered": list(plan.uncovered),
                             "node_names": {str(c.node_id): c.identity for c in live},
                             "bytes_to": bytes_to}
        self.pending = msgs
        return [m for m, _, _ in msgs]

    def sampled(self, live: list[NodeCapacity], rnd: int) -> list[NodeCapacity]:
        """This round's sample of the live nodes (noprop.sampling, by their names), with the cycle's next nodes
        added until the sample can hold every block."""
        cfg = self.cfg
        by_name = {c.identity: c for c in live}
        picked = sample_round(list(by_name), cfg.fraction_train, cfg.min_train_nodes, rnd - 1, cfg.seed)
        picked = extend_until(picked, list(by_name), cfg.seed,
                              lambda names: sum(min(by_name[n].max_blocks, cfg.T) for n in names) >= cfg.T)
        chosen = set(picked)
        return [c for c in live if c.identity in chosen]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, combine each block from its owners and the shared tensors from all, fit the head."""
        cfg, plan, rnd = self.cfg, self.plan, server_round
        # message id -> what its node must send back: ids exist once the grid has pushed the messages
        sent = {m.metadata.message_id: Expected(node, tuple(keys), tuple(f"l2-block-{t}" for t in plan.blocks_of(node)),
                                                self.capacities[node].num_examples if node in self.capacities else None)
                for m, node, keys in self.pending}
        checked = check_replies(replies, sent, self.global_state, rnd, cfg.max_value_ratio, self.log,
                                silence=f"no reply within {cfg.round_timeout:.0f}s; its blocks go to others next round")
        accepted = [reply for _, reply in checked.accepted]
        for node in checked.failed:  # re-discover next round if it is still there
            self.capacities.pop(node, None)
        losses: dict[int, list[float]] = {}
        for reply in accepted:
            for t in plan.blocks_of(reply.node_id):
                losses.setdefault(t, []).append(float(reply.metrics[f"l2-block-{t}"]))
        block_l2 = {str(t): sum(v) / len(v) for t, v in sorted(losses.items())}
        record = self.round_record
        record.update({
            "trained_by": sorted(r.node_id for r in accepted),
            "rejected": {str(k): v for k, v in checked.rejected.items()}, "failed": sorted(checked.failed),
            "block_l2": block_l2, "mean_l2": sum(block_l2.values()) / max(len(block_l2), 1),
            "bytes_from": {str(k): v for k, v in checked.bytes_from.items()},
            "num_examples": {str(r.node_id): r.num_examples for r in accepted},
            "client_train_time_s": {str(r.node_id): round(float(r.metrics.get("train-time-s", 0.0)), 2)
                                    for r in accepted},
            "client_timing": {str(r.node_id): client_timing(r.metrics) for r in accepted},
        })
        self.on_phase("validate")
        # float sums depend on their order: combine in the nodes' stable names, not in the order replies came
        accepted.sort(key=lambda r: self.capacities[r.node_id].identity)  # accepted: planned, so discovered
        steps = self.coverage_steps(accepted) if cfg.coverage_step else {}
        if steps:
            record["block_step"] = {str(t): round(v, 4) for t, v in sorted(steps.items())}
        if self.block_classes:  # what each block has been trained on, for the next rounds' steps and a resume
            record["block_classes"] = {str(t): sorted(c) for t, c in sorted(self.block_classes.items())}
        self.global_state = aggregate(self.global_state, plan, accepted, cfg.aggregation, cfg.trim_fraction,
                                      block_step=steps)
        self.on_phase("aggregate")
        if cfg.head_steps and accepted:
            record["head_fit"] = self.fit_head(rnd)  # before the next round: the head goes out with the blocks
            self.on_phase("head_fit")
        return arrays_to_record(self.global_state), MetricRecord({"mean-l2": record["mean_l2"]})

    def coverage_steps(self, accepted: list[Reply]) -> dict[int, float]:
        """Each block's step towards its owners' mean: the share that the classes they hold (from discovery) are of
        every class the block has been trained on so far, these included. A block that knows 8 classes and whose
        owners bring 2 moves a fifth of the way, so it keeps most of what it knew of the other 6; a block's first
        owners, or owners of the classes it already knows (IID data), take the full step. Blocks whose owners
        reported no classes take the full step and learn nothing for the next rounds."""
        held: dict[int, set[int]] = {}
        for r in accepted:
            for t in self.plan.blocks_of(r.node_id):
                held.setdefault(t, set()).update(self.capacities[r.node_id].classes)
        steps = {}
        for t, classes in held.items():
            if not classes:
                continue
            known = self.block_classes.setdefault(t, set())
            known |= classes
            if len(classes) < len(known):
                steps[t] = len(classes) / len(known)
        return steps

    def fit_head(self, rnd: int) -> dict[str, float]:
        """Retrain the aggregated head on the server, class-balanced, from q(z_T | y): no images, as many steps as
        it needs, whatever the nodes' label mix (their averaged head saw a few dozen skewed steps each)."""
        self.model.load_state_dict(to_torch_state(self.global_state))
        parts = fit_head(self.model, self.cfg.head_steps, seed=node_seed(self.cfg.seed, rnd, 0))
        state = to_numpy_state(self.model.state_dict())
        for key in state:
            if key.startswith("head."):
                self.global_state[key] = state[key]
        return {k: round(v, 4) for k, v in parts.items()}

    READY = "connected and answered discovery"  # what ready_nodes means, for the run's messages

    def ready_nodes(self, grid: Grid, nodes: list[int], rnd: int) -> list[int]:
        """The nodes among `nodes` that have answered discovery (querying those not yet known, again if they were
        silent before): the run waits on this for enough nodes before a round. A restarted server's file database
        lists its clients as online before they have reconnected, and a round planned then would leave them out."""
        self.grid = grid
        self.discover(nodes, rnd, again=True)
        return [n for n in nodes if n in self.capacities]

    def discover(self, nodes: list[int], rnd: int, again: bool = False) -> None:
        """Query nodes not yet known (not again in a round they were silent in, unless `again`); forget nodes
        that are gone."""
        known = self.capacities
        for n in list(known):
            if n not in nodes:
                del known[n]
        new = [n for n in nodes if n not in known and (again or self.silent_in.get(n) != rnd)]
        if not new:
            return
        content = QueryInstructions(self.model_cfg, self.cfg.batch_size).to_record()
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
                                   memory_mb=float(c["memory-mb"]), name=str(c.get("name") or ""),
                                   classes=frozenset(int(k) for k in c.get("classes", [])))
                if not all(0 <= k < self.model_cfg.num_classes for k in cap.classes):
                    raise ValueError(f"classes {sorted(cap.classes)} outside 0..{self.model_cfg.num_classes - 1}")
                if not (cap.max_blocks >= 1 and cap.num_examples >= 1 and math.isfinite(cap.throughput)
                        and cap.throughput > 0):
                    raise ValueError("max-blocks, num-examples and throughput must be positive")
            except Exception as exc:  # noqa: BLE001 - a malformed answer must not stop the run
                self.log(f"node {node}: discovery reply rejected: {type(exc).__name__}: {exc}")
                continue
            clash = [n for n, other in known.items() if other.identity == cap.identity]
            if clash:  # names only order and seed nodes; two nodes with one name would draw the same seeds
                cap = replace(cap, name=f"{cap.identity}@{node}")
                self.log(f"WARNING: node {node} calls itself {c.get('name')!r} like node {clash[0]}: planned as "
                         f"{cap.identity!r} (give each noprop-client its own --name or --partition)")
            known[node] = cap
            self.log(f"node {node} ({cap.identity}): {c['device']}, {cap.num_examples} examples of "
                     f"{c.get('data', '?')}, "
                     f"{cap.throughput:.0f} samples/s per block, holds up to {cap.max_blocks} blocks")
        for n in new:
            if n not in known:
                self.silent_in[n] = rnd

    # -- client evaluation (--client-eval) ---------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The assembled chain, to every node that can hold all T blocks (none unless the run asks for it); config
        holds the run's EvaluateInstructions."""
        if not self.cfg.client_eval:
            return []
        return [Message(RecordDict({"arrays": arrays, "config": config}), n, MessageType.EVALUATE,
                        group_id=f"evaluate-{server_round}")
                for n, c in self.capacities.items() if c.max_blocks >= self.cfg.T]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The nodes' accuracy, weighted by their examples; None if no node evaluated."""
        total, correct = 0, 0.0
        for msg in replies:
            if msg.has_error():
                continue
            m = msg.content["metrics"]
            total += int(m["num-examples"])
            correct += float(m["accuracy"]) * int(m["num-examples"])
        return MetricRecord({"accuracy": correct / total}) if total else None

