"""A federation of a one-network method (NoProp-CT, NoProp-FM, the adjoint ODE, the backprop chain, the CNN): FedAvg.

These methods have one network shared across time (or one chain trained end to end), so there are no blocks to
own: every node trains the whole network on its local data for the round and the server averages the replies
with Flower's own FedAvg strategy. Replies pass the same checks as NoProp-DT's (noprop.server.aggregate) before
FedAvg sees them, and the run writes the same files as a block-ownership run: metrics.jsonl (a line per round),
checkpoint.pt (every round, atomic, resumable), accuracy.png and DONE.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from noprop.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from noprop.data import load_dataset
from noprop.federation import FederationConfig
from noprop.io import append_jsonl, atomic_write_text, read_jsonl
from noprop.methods import build_model
from noprop.model_configs import parse_embedding
from noprop.plots import plot_federated_run
from noprop.records import arrays_to_record, record_to_arrays, state_digest
from noprop.server.aggregate import Reply, validate_reply
from noprop.server.rounds import FederationError
from noprop.trainer import evaluate_accuracy


class CheckedReplies:
    """A mixin for Flower's FedAvg family: every reply is checked like a block owner's and each node's traffic
    is recorded.

    A reply that fails the checks (round stamp, keys, shapes, dtypes, finite values, values within
    max_value_ratio of the global model's) is dropped whole and logged by node id before the strategy combines
    the rest.
    """

    def __init__(self, log=print, round_offset: int = 0, max_value_ratio: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.log = log
        self.round_offset = round_offset
        self.max_value_ratio = max_value_ratio
        self.reference: dict = {}
        self.round_record: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.begin_round(arrays, msgs)
        return msgs

    def begin_round(self, arrays: ArrayRecord, msgs: list[Message]) -> None:
        """Remember what was sent this round: the reference the replies are checked against, and the traffic."""
        self.reference = record_to_arrays(arrays)
        self.round_record = {"model_in": state_digest(self.reference),  # the model this round trains from
                             "sent_to": sorted(m.metadata.dst_node_id for m in msgs),
                             "bytes_to": {str(m.metadata.dst_node_id): m.content[self.arrayrecord_key].count_bytes()
                                          for m in msgs},
                             "bytes_from": {}, "num_examples": {}, "client_train_time_s": {},
                             "client_train_loss": {}, "rejected": {}, "failed": []}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rec = self.round_record
        keys = list(self.reference)
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rec["failed"].append(node)
                self.log(f"node {node}: training failed: {msg.error.reason}")
                continue
            arrays = msg.content.get(self.arrayrecord_key)
            metrics = msg.content.get("metrics")
            if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord) \
                    or "num-examples" not in metrics:
                problem = "reply lacks its arrays or its num-examples"
            else:
                reply = Reply(node_id=node, arrays=record_to_arrays(arrays), num_examples=metrics["num-examples"],
                              round=int(metrics["round"]) if "round" in metrics else None)
                problem = validate_reply(reply, keys, self.reference, expected_round=self.round_offset + server_round,
                                         max_value_ratio=self.max_value_ratio)
            if problem:
                rec["rejected"][str(node)] = problem
                self.log(f"node {node}: reply rejected: {problem}")
                continue
            rec["bytes_from"][str(node)] = arrays.count_bytes()
            rec["num_examples"][str(node)] = int(metrics["num-examples"])
            rec["client_train_time_s"][str(node)] = round(float(metrics.get("train-time-s", 0.0)), 2)
            rec["client_train_loss"][str(node)] = round(float(metrics.get("train-loss", float("nan"))), 4)
            accepted.append(msg)
        answered = {m.metadata.src_node_id for m in accepted} | set(rec["failed"]) | {int(n) for n in rec["rejected"]}
        for node in rec["sent_to"]:
            if node not in answered:
                rec["failed"].append(node)
                self.log(f"node {node}: no reply within the round timeout")
        if not accepted:
            return None, None  # FedAvg keeps the previous global arrays
        arrays, metrics = super().aggregate_train(server_round, accepted)
        return (None if arrays is None else self.in_sent_dtypes(arrays)), metrics

    def in_sent_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Flower's aggregation returns float64 for every array; integer buffers (BatchNorm's num_batches_tracked)
        must go out again as the integers they were, or every next reply is rejected for its dtype."""
        out = {}
        for key, value in record_to_arrays(arrays).items():
            dtype = self.reference[key].dtype if key in self.reference else value.dtype
            out[key] = (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)
        return arrays_to_record(out)


STRATEGIES = {"mean": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg}  # by --aggregation


def checked_strategy(cfg: FederationConfig, round_offset: int, log=print) -> FedAvg:
    """Flower's FedAvg (or FedMedian / FedTrimmedAvg, per --aggregation) with CheckedReplies, on every node."""
    base = STRATEGIES[cfg.aggregation]
    kwargs = {"beta": cfg.trim_fraction} if base is FedTrimmedAvg else {}
    strategy_class = type(f"Checked{base.__name__}", (CheckedReplies, base), {})
    return strategy_class(log=log, round_offset=round_offset, max_value_ratio=cfg.max_value_ratio,
                          fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
                          **kwargs)


class FedAvgFederation:
    """One FedAvg run of a one-network method: wait for nodes, FedAvg rounds, evaluate, checkpoint, finish."""

    def __init__(self, grid: Grid, cfg: FederationConfig, log=print):
        self.grid, self.cfg, self.log = grid, cfg, log
        if parse_embedding(cfg.embedding)[0] == "prototype":
            raise FederationError("prototype embeddings need training images on the server; federated runs "
                                  "support one-hot and learned:D (set embedding accordingly)")
        self.eval_data = load_dataset(cfg.dataset, split="test", root=cfg.data_root or None)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        self.model_cfg = cfg.model_config(self.eval_data.input_shape, self.eval_data.num_classes)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.method, self.model_cfg)
        self.done_rounds = 0
        self.records: list[dict] = []
        if cfg.resume and self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            if ckpt.method != cfg.method or ckpt.config != self.model_cfg:
                raise FederationError(f"{self.ckpt_path} was trained with another method or model config: use a new "
                                 "--out or the original settings")
            self.model.load_state_dict(ckpt.state_dict)
            self.done_rounds = int(ckpt.extra["round"])
            self.records = [r for r in read_jsonl(self.metrics_path) if r["round"] <= self.done_rounds] \
                if self.metrics_path.exists() else []
            self.log(f"resuming after round {self.done_rounds} from {self.ckpt_path}")
        else:
            self.metrics_path.unlink(missing_ok=True)

    def run(self) -> dict:
        cfg = self.cfg
        self.log(f"noprop federation: {cfg.num_rounds} rounds of FedAvg of one {cfg.method} network (every node "
                 f"trains all of it; no blocks to own), embedding {cfg.embedding}, evaluating on "
                 f"{self.eval_data.name} test ({cfg.eval_limit or len(self.eval_data)} examples per round); "
                 f"output in {self.out}")
        remaining = cfg.num_rounds - self.done_rounds
        if remaining > 0:
            self.wait_for_nodes()
            strategy = checked_strategy(cfg, self.done_rounds, self.log)
            train_config = ConfigRecord({
                "method": cfg.method, "model-config": json.dumps(self.model_cfg.to_dict()),
                "local-epochs": cfg.local_epochs, "lr": cfg.lr, "weight-decay": cfg.weight_decay,
                "batch-size": cfg.batch_size, "seed": cfg.seed, "min-local-steps": cfg.min_local_steps,
            })
            clock = {"start": time.perf_counter()}

            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                if server_round == 0:  # FedAvg evaluates the starting model too; the round clock starts here
                    clock["start"] = time.perf_counter()
                    return None
                record = self.finish_round(self.done_rounds + server_round, arrays, strategy.round_record,
                                           time.perf_counter() - clock["start"])
                clock["start"] = time.perf_counter()
                return MetricRecord({"accuracy": record["accuracy"]})

            # the round number travels in the config so a node seeds each round differently after a resume too
            train_config["round-offset"] = self.done_rounds
            strategy.start(grid=self.grid, initial_arrays=ArrayRecord(self.model.state_dict()),
                           num_rounds=remaining, timeout=cfg.round_timeout, train_config=train_config,
                           evaluate_fn=evaluate_fn)
        return self.finish()

    def wait_for_nodes(self) -> None:
        """FedAvg would wait for nodes forever; a run waits at most the join timeout for min_nodes."""
        deadline = time.monotonic() + self.cfg.join_timeout
        while (n := len(list(self.grid.get_node_ids()))) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                raise FederationError(f"{n} of the {self.cfg.min_nodes} required nodes connected within "
                                 f"{self.cfg.join_timeout:.0f}s: start more noprop-client processes or lower min-nodes")
            time.sleep(1.0)

    def finish_round(self, rnd: int, arrays: ArrayRecord, traffic: dict, seconds: float) -> dict:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        record = {"round": rnd, "accuracy": self.evaluate(self.cfg.eval_limit),
                  "trained_by": sorted(int(n) for n in traffic.get("num_examples", {})),
                  **{k: v for k, v in traffic.items() if k != "sent_to"},
                  "nodes": traffic.get("sent_to", []), "round_time_s": round(seconds, 2)}
        losses = [v for v in record["client_train_loss"].values() if v == v]
        record["train_loss"] = sum(losses) / len(losses) if losses else None
        self.records.append(record)
        append_jsonl(self.metrics_path, record)
        self.save(record)
        loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        self.log(f"round {rnd}/{self.cfg.num_rounds}  accuracy {100 * record['accuracy']:.2f}%  "
                 f"nodes {len(record['trained_by'])}/{len(record['nodes'])}  mean train loss {loss}  "
                 f"{record['round_time_s']:.1f}s")
        return record

    def evaluate(self, limit: int) -> float:
        data = self.eval_data if not limit else self.eval_data.subset(range(min(limit, len(self.eval_data))))
        return evaluate_accuracy(self.model, data, self.cfg.eval_mode, seed=self.cfg.seed)

    def save(self, record: dict) -> None:
        save_checkpoint(self.ckpt_path, Checkpoint(
            method=self.cfg.method, config=self.model_cfg, state_dict=self.model.state_dict(),
            data=self.eval_data.describe(), metrics={"accuracy": record["accuracy"], "round": record["round"]},
            extra={"round": record["round"], "federation": self.cfg.to_run_config()}))

    def finish(self) -> dict:
        final_acc = self.evaluate(self.cfg.final_eval_limit)
        n = self.cfg.final_eval_limit or len(self.eval_data)
        plot_federated_run(self.records, self.out / "accuracy.png", None)
        done = {"rounds": len(self.records) and self.records[-1]["round"], "accuracy": final_acc,
                "eval_examples": n, "eval_mode": self.cfg.eval_mode, "checkpoint": str(self.ckpt_path),
                "method": self.cfg.method}
        atomic_write_text(self.out / "DONE.json", json.dumps(done, indent=2))
        self.log(f"done: final accuracy {100 * final_acc:.2f}% on {n} test examples ({self.cfg.eval_mode}); "
                 f"checkpoint {self.ckpt_path}, plot {self.out / 'accuracy.png'}")
        return done


def run_fedavg(grid: Grid, cfg: FederationConfig, log=print) -> dict:
    return FedAvgFederation(grid, cfg, log).run()
