"""The messages between the server and a node: what each kind asks, in one typed place for both sides.

A round speaks three kinds of Flower message (MessageType): QUERY (NoProp-DT's discovery: what can you hold, how
fast), TRAIN and EVALUATE. The server encodes a kind's instructions with `to_record()` into the message's
"config" ConfigRecord, the node decodes them with `from_record()`; a missing or ill-typed key is a
`ProtocolError` that names it. Every method's messages use the same instructions: a TRAIN message carries every
training setting once (the node reads none of them from the run config), and NoProp-DT's add the blocks a node
owns and the name it is planned under.

One rule for seeds: a node trains round r with `node_seed(run seed, r, name)`, derived on the node from the
instructions (`TrainInstructions.seed_for`). The name is the one the server planned it under when the message
carries one (NoProp-DT: discovery's name, made unique if two nodes claim the same), else the node's own
(FedAvg: the server knows no names). Round numbers are the run's own ("round"), which a resumed run goes on from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from noprop.methods import method_named

if TYPE_CHECKING:
    from noprop.federation import FederationConfig

# Keys a client reads from its Flower node config (noprop-client sets them; simulation sets the partition).
NODE_CONFIG_KEYS = {
    "data": "dataset spec of this node's data (default: the run's client-data or dataset)",
    "data-root": "folder holding the datasets",
    "partition-id": "which partition of the data this node holds (0-based)",
    "num-partitions": "how many partitions the data is split into",
    "partition-type": "iid | dirichlet:ALPHA | classes:K (default: the run's partition-type)",
    "device": "auto | cpu | cuda | cuda:N | mps",
    "max-blocks": "most blocks this node will hold at once (0 = as many as memory allows)",
    "memory-mb": "memory budget in MB for training (0 = measured)",
    "threads": "torch threads (0 = the run's client-threads)",
    "node-name": "this node's stable identity for the plan and its seeds (default: its node key's name, else "
                 "partition-I-of-N); never used to address or authenticate it",
    "share-labels": "1 (default): tell the server in discovery which classes this node holds (no counts), for "
                    "label-aware ownership; 0: keep them to itself",
    "worker-dir": "folder of the node's warm worker (noprop-client sets it; absent: every message runs in-process)",
    "worker-owner": "pid of the process whose end stops the warm worker (the noprop-client launcher)",
}


class ProtocolError(ValueError):
    """A message whose instructions cannot be read: the reason names the key."""


def _get(record: ConfigRecord, key: str, kind: type, default: Any = ...) -> Any:
    if key not in record:
        if default is ...:
            raise ProtocolError(f"the message's config has no {key!r}")
        return default
    value = record[key]
    try:
        if kind is bool:
            return bool(value)
        if kind in (int, float) and isinstance(value, bool | str | bytes):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"the message's {key!r} is {value!r}, not a {kind.__name__}") from None


def _model_config(record: ConfigRecord, method: str):
    try:
        return method_named(method).config_class.from_dict(json.loads(str(record["model-config"])))
    except KeyError:
        raise ProtocolError("the message's config has no 'model-config'") from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"the message's model-config cannot be read for method {method!r}: {exc}") from None


@dataclass(frozen=True)
class TrainInstructions:
    """A TRAIN message's config: the round's settings for every method, and NoProp-DT's per-node part."""

    method: str
    model_config: Any  # the method's config dataclass (NoPropConfig, CTConfig, ...)
    round: int
    run_seed: int
    local_epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    min_local_steps: int = 0
    logit_adjust: bool = False  # dt: balanced softmax with the node's label prior
    split_local_data: bool = False  # dt: each of a node's k blocks trains on its own 1/k of the data
    blocks: tuple[int, ...] = ()  # dt: the blocks this node trains (empty: the whole network, FedAvg)
    node_name: str = ""  # dt: the name the server planned this node under ("" = the node's own)

    @classmethod
    def for_run(cls, cfg: FederationConfig, model_config: Any, rnd: int = 0) -> TrainInstructions:
        """What every node is told in a round of `cfg`; a strategy adds the round and any per-node part."""
        return cls(method=cfg.method, model_config=model_config, round=rnd, run_seed=cfg.seed,
                   local_epochs=cfg.local_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
                   batch_size=cfg.batch_size, min_local_steps=cfg.min_local_steps, logit_adjust=cfg.logit_adjust,
                   split_local_data=cfg.split_local_data)

    def for_node(self, rnd: int, blocks: tuple[int, ...] = (), node_name: str = "") -> TrainInstructions:
        return replace(self, round=rnd, blocks=tuple(blocks), node_name=node_name)

    def seed_for(self, own_name: str) -> int:
        """This node's seed for the round: the run seed, the round and the name it is planned under (or its own)."""
        from noprop.trainer import node_seed  # torch: only a node that trains imports it

        return node_seed(self.run_seed, self.round, self.node_name or own_name)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "method": self.method, "model-config": json.dumps(self.model_config.to_dict()), "round": self.round,
            "seed": self.run_seed, "local-epochs": self.local_epochs, "lr": self.lr,
            "weight-decay": self.weight_decay, "batch-size": self.batch_size,
            "min-local-steps": self.min_local_steps, "logit-adjust": self.logit_adjust,
            "split-local-data": self.split_local_data, "blocks": [int(b) for b in self.blocks],
            "node-name": self.node_name})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        method = _get(record, "method", str)
        return cls(method=method, model_config=_model_config(record, method), round=_get(record, "round", int),
                   run_seed=_get(record, "seed", int), local_epochs=_get(record, "local-epochs", int),
                   lr=_get(record, "lr", float), weight_decay=_get(record, "weight-decay", float),
                   batch_size=_get(record, "batch-size", int),
                   min_local_steps=_get(record, "min-local-steps", int, 0),
                   logit_adjust=_get(record, "logit-adjust", bool, False),
                   split_local_data=_get(record, "split-local-data", bool, False),
                   blocks=tuple(int(b) for b in record.get("blocks", [])),
                   node_name=_get(record, "node-name", str, ""))


@dataclass(frozen=True)
class EvaluateInstructions:
    """An EVALUATE message's config: the network in the message is of `method`, read out in `eval_mode`."""

    method: str
    model_config: Any
    eval_mode: str = "deterministic"
    seed: int = 0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"method": self.method, "model-config": json.dumps(self.model_config.to_dict()),
                             "eval-mode": self.eval_mode, "seed": self.seed})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> EvaluateInstructions:
        method = _get(record, "method", str)
        return cls(method=method, model_config=_model_config(record, method),
                   eval_mode=_get(record, "eval-mode", str, "deterministic"), seed=_get(record, "seed", int, 0))


@dataclass(frozen=True)
class QueryInstructions:
    """A QUERY message's config (NoProp-DT's discovery): the blocks' config and the batch size to measure at."""

    model_config: Any
    batch_size: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"model-config": json.dumps(self.model_config.to_dict()), "batch-size": self.batch_size})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> QueryInstructions:
        return cls(model_config=_model_config(record, "dt"), batch_size=_get(record, "batch-size", int))
