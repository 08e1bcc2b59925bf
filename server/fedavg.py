"""The one-network methods' round (NoProp-CT, NoProp-FM, the adjoint ODE, the backprop chain, the CNN): Flower's
FedAvg, FedMedian or FedTrimmedAvg, with every reply checked first.

These methods have one network shared across time (or one chain trained end to end), so there are no blocks to
own: every node trains the whole network on its local data for the round and the strategy combines the replies
by its own rule. Replies pass the same check as NoProp-DT's (noprop.server.aggregate.check_replies) before the
strategy sees them. The run around the rounds (server/run.py) is the same as a block-ownership run's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from noprop.federation import FederationConfig
from noprop.plots import plot_federated_run
from noprop.protocol import TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, state_digest
from noprop.sampling import sample_round
from noprop.server.aggregate import Expected, check_replies


class CheckedReplies:
    """A mixin for Flower's FedAvg family: every reply passes the one reply check (noprop.server.aggregate.
    check_replies: round stamp, keys, shapes, dtypes, finite values, values within max_value_ratio of the global
    model's) before the strategy combines the rest; a reply that fails it is dropped whole and logged by node id.
    After aggregate_train, `round_record` holds the round's metrics.jsonl fields but evaluation and timing.
    """

    READY = "connected"  # what ready_nodes means, for the run's messages

    def __init__(self, cfg: FederationConfig, log=print, **kwargs):
        super().__init__(**kwargs)
        self.cfg, self.log = cfg, log
        self.max_value_ratio = cfg.max_value_ratio
        self.reference: dict = {}
        self.sent: list[Message] = []
        self.round_record: dict = {}

    def describe(self) -> str:
        """The round's shape, for the run's first line."""
        return f"FedAvg of one {self.cfg.method} network (every node trains all of it; no blocks to own)"

    def plot_run(self, records: list[dict], out: Path) -> list[Path]:
        """Accuracy per round."""
        plot_federated_run(records, out / "accuracy.png", None)
        return [out / "accuracy.png"]

    def ready_nodes(self, grid: Grid, nodes: list[int], rnd: int) -> list[int]:
        """Every connected node is ready: a FedAvg round sends the whole model to whoever is there."""
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # the run's own round number, which a resumed run goes on from; each node seeds by it and its own name
        config = TrainInstructions.from_record(config).for_node(server_round).to_record()
        everyone = list(super().configure_train(server_round, arrays, config, grid))
        msgs = self.sampled(everyone, server_round)
        self.begin_round(server_round, arrays, msgs, nodes=[m.metadata.dst_node_id for m in everyone])
        return msgs

    def sampled(self, msgs: list[Message], server_round: int) -> list[Message]:
        """This round's sample (noprop.sampling) of Flower's message to every node. Names are learnt only from
        replies, so the FedAvg rotation orders nodes by Flower's node id: reproducible while the ids are."""
        by_name = {f"node-{m.metadata.dst_node_id:020d}": m for m in msgs}
        picked = sample_round(list(by_name), self.cfg.fraction_train, self.cfg.min_train_nodes, server_round - 1,
                              self.cfg.seed)
        return [by_name[name] for name in picked]

    def begin_round(self, server_round: int, arrays: ArrayRecord, msgs: list[Message],
                    nodes: list[int] | None = None) -> None:
        """Remember what was sent this round: the reference the replies are checked against, and the traffic.
        `nodes`: every connected node (default: those sent to), as NoProp-DT's record lists them."""
        self.reference = record_to_arrays(arrays)
        self.sent = msgs
        sampled = sorted(m.metadata.dst_node_id for m in msgs)
        self.round_record = {"round": server_round,
                             "model_in": state_digest(self.reference),  # the model this round trains from
                             "nodes": sampled if nodes is None else sorted(nodes), "sampled": sampled,
                             "bytes_to": {str(m.metadata.dst_node_id): m.content[self.arrayrecord_key].count_bytes()
                                          for m in msgs}}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        keys = tuple(self.reference)
        # message id -> what its node must send back: ids exist once the grid has pushed the messages
        sent = {m.metadata.message_id: Expected(m.metadata.dst_node_id, keys) for m in self.sent}
        checked = check_replies(replies, sent, self.reference, server_round, self.max_value_ratio, self.log,
                                arrays_key=self.arrayrecord_key)
        accepted = []
        for msg, reply in checked.accepted:
            # Flower's strategies combine Arrays key by key: they get one Array per tensor, never the packed bytes
            msg.content[self.arrayrecord_key] = arrays_to_record(reply.arrays, packed=False)
            accepted.append((msg, reply))
        rec = self.round_record
        losses = {str(r.node_id): round(float(r.metrics.get("train-loss", float("nan"))), 4) for _, r in accepted}
        rec.update({
            "bytes_from": {str(k): v for k, v in checked.bytes_from.items()},
            "num_examples": {str(r.node_id): r.num_examples for _, r in accepted},
            "client_train_time_s": {str(r.node_id): round(float(r.metrics.get("train-time-s", 0.0)), 2)
                                    for _, r in accepted},
            "client_train_loss": losses,
            "rejected": {str(k): v for k, v in checked.rejected.items()}, "failed": checked.failed,
            "trained_by": sorted(r.node_id for _, r in accepted)})
        finite = [v for v in losses.values() if v == v]
        rec["train_loss"] = sum(finite) / len(finite) if finite else None
        if not accepted:
            return None, None  # FedAvg keeps the previous global arrays
        # float sums depend on their order: sum in the nodes' stable names, not in the order the replies came
        accepted.sort(key=lambda pair: reply_identity(pair[0]))
        rec["node_names"] = {str(r.node_id): reply_identity(m) for m, r in accepted}
        arrays, metrics = super().aggregate_train(server_round, [m for m, _ in accepted])
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


class CheckedFedAvg(CheckedReplies, FedAvg):
    """Flower's FedAvg (the replies' weighted mean), every reply checked first."""


class CheckedFedMedian(CheckedReplies, FedMedian):
    """Flower's FedMedian (the coordinate-wise median), every reply checked first."""


class CheckedFedTrimmedAvg(CheckedReplies, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (the mean after cutting --trim-fraction at each end), every reply checked first."""


STRATEGIES = {"mean": CheckedFedAvg, "median": CheckedFedMedian, "trimmed-mean": CheckedFedTrimmedAvg}


def checked_strategy(cfg: FederationConfig, model_cfg=None, model=None, log=print, history=None,
                     on_phase=None) -> CheckedReplies:
    """The one-network methods' Strategy (METHODS' factory signature; the model and history are not needed):
    Flower's FedAvg, FedMedian or FedTrimmedAvg per --aggregation, on every node; with --client-eval every node
    also evaluates the round's model on its own test data (Flower's aggregate_evaluate weights by num-examples)."""
    strategy_class = STRATEGIES[cfg.aggregation]
    kwargs = {"beta": cfg.trim_fraction} if strategy_class is CheckedFedTrimmedAvg else {}
    return strategy_class(cfg, log=log, fraction_train=1.0, fraction_evaluate=1.0 if cfg.client_eval else 0.0,
                          min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1, **kwargs)
