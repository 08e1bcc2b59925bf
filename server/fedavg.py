"""The one-network methods' round (NoProp-CT, NoProp-FM, the adjoint ODE, the backprop chain, the CNN): Flower's
FedAvg, FedMedian or FedTrimmedAvg, with every reply checked first.

These methods have one network shared across time (or one chain trained end to end), so there are no blocks to
own: every node trains the whole network on its local data for the round and the strategy combines the replies
by its own rule. Replies pass the same checks as NoProp-DT's (noprop.server.aggregate) before the strategy sees
them. The run around the rounds (server/run.py) is the same as a block-ownership run's.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from noprop.federation import FederationConfig
from noprop.records import arrays_to_record, record_to_arrays, state_digest
from noprop.server.aggregate import Reply, validate_reply
from noprop.server.timing import PhaseClock


class CheckedReplies:
    """A mixin for Flower's FedAvg family: every reply is checked like a block owner's and each node's traffic
    is recorded.

    A reply that fails the checks (round stamp, keys, shapes, dtypes, finite values, values within
    max_value_ratio of the global model's) is dropped whole and logged by node id before the strategy combines
    the rest. After aggregate_train, `round_record` holds the round's metrics.jsonl fields but evaluation.
    """

    def __init__(self, log=print, max_value_ratio: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.log = log
        self.max_value_ratio = max_value_ratio
        self.reference: dict = {}
        self.round_record: dict = {}
        self.clock = PhaseClock()  # the run gives each round its own; the strategy has no phases of its own

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.begin_round(server_round, arrays, msgs)
        return msgs

    def begin_round(self, server_round: int, arrays: ArrayRecord, msgs: list[Message]) -> None:
        """Remember what was sent this round: the reference the replies are checked against, and the traffic."""
        self.reference = record_to_arrays(arrays)
        self.round_record = {"round": server_round,
                             "model_in": state_digest(self.reference),  # the model this round trains from
                             "nodes": sorted(m.metadata.dst_node_id for m in msgs),
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
                try:  # a packed record is the sender's word: a malformed one is a reason, not a crash
                    received = record_to_arrays(arrays)
                except Exception as exc:
                    received, problem = None, f"malformed reply ({type(exc).__name__}: {exc})"
                if received is not None:
                    reply = Reply(node_id=node, arrays=received, num_examples=metrics["num-examples"],
                                  round=int(metrics["round"]) if "round" in metrics else None)
                    problem = validate_reply(reply, keys, self.reference, expected_round=server_round,
                                             max_value_ratio=self.max_value_ratio)
            if problem:
                rec["rejected"][str(node)] = problem
                self.log(f"node {node}: reply rejected: {problem}")
                continue
            rec["bytes_from"][str(node)] = arrays.count_bytes()
            rec["num_examples"][str(node)] = int(metrics["num-examples"])
            rec["client_train_time_s"][str(node)] = round(float(metrics.get("train-time-s", 0.0)), 2)
            rec["client_train_loss"][str(node)] = round(float(metrics.get("train-loss", float("nan"))), 4)
            # Flower's strategies combine Arrays key by key: they get one Array per tensor, never the packed bytes
            msg.content[self.arrayrecord_key] = arrays_to_record(reply.arrays, packed=False)
            accepted.append(msg)
        answered = {m.metadata.src_node_id for m in accepted} | set(rec["failed"]) | {int(n) for n in rec["rejected"]}
        for node in rec["nodes"]:
            if node not in answered:
                rec["failed"].append(node)
                self.log(f"node {node}: no reply within the round timeout")
        rec["trained_by"] = sorted(m.metadata.src_node_id for m in accepted)
        losses = [v for v in rec["client_train_loss"].values() if v == v]
        rec["train_loss"] = sum(losses) / len(losses) if losses else None
        if not accepted:
            return None, None  # FedAvg keeps the previous global arrays
        # float sums depend on their order: sum in the nodes' stable names, not in the order the replies came
        accepted.sort(key=reply_identity)
        rec["node_names"] = {str(m.metadata.src_node_id): reply_identity(m) for m in accepted}
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


def reply_identity(msg: Message) -> str:
    """The name a FedAvg reply gives its node (noprop.client.handlers.node_identity), else its node id."""
    identity = msg.content.get("identity")
    name = identity.get("name") if isinstance(identity, ConfigRecord) else None
    return str(name) if name else f"node-{msg.metadata.src_node_id}"


STRATEGIES = {"mean": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg}  # by --aggregation


def checked_strategy(cfg: FederationConfig, log=print) -> FedAvg:
    """Flower's FedAvg (or FedMedian / FedTrimmedAvg, per --aggregation) with CheckedReplies, on every node."""
    base = STRATEGIES[cfg.aggregation]
    kwargs = {"beta": cfg.trim_fraction} if base is FedTrimmedAvg else {}
    strategy_class = type(f"Checked{base.__name__}", (CheckedReplies, base), {})
    return strategy_class(log=log, max_value_ratio=cfg.max_value_ratio,
                          fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
                          **kwargs)
