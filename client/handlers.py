"""What a node does with each message: answer discovery, train what it is given, evaluate the round's model. The
messages' instructions are noprop.protocol's; a TRAIN message goes to its method's trainer (METHODS): NoProp-DT's
blocks here (train_blocks), a one-network method's whole network in client/fedavg.py (FedAvg).

The handlers take a message's content and the node's settings and return the reply's content, so that the same
code runs inside Flower's per-message ClientApp process (client/app.py, a cold start) and in the node's warm
worker (client/worker.py), which keeps torch, the data and its partition loaded between messages.

A node builds only the blocks it was sent (plus the shared embedding and head): it never holds a block it does
not own while training, and it replies with exactly the keys it received.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from noprop.client.capacity import available_memory_mb, max_blocks_for_memory, measure_throughput
from noprop.data import LabelledData, load_dataset
from noprop.device import resolve_device
from noprop.federation import FederationConfig
from noprop.methods import build_model, load, method_named
from noprop.model import NoPropDT
from noprop.partition import partition
from noprop.protocol import EvaluateInstructions, QueryInstructions, TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state, to_torch_state
from noprop.trainer import (
    BlockTrainer,
    OptimConfig,
    epochs_for_min_steps,
    evaluate_accuracy,
    label_log_prior,
    split_among_blocks,
    train_owned_blocks,
)


@lru_cache(maxsize=4)
def local_data(spec: str, root: str, split: str, partition_id: int, num_partitions: int, partition_type: str,
               seed: int) -> LabelledData:
    """This node's share of a dataset: the same seeded partition on every call and in every process."""
    data = load_dataset(spec, split=split, root=root or None)
    if num_partitions <= 1:
        return data
    parts = partition(data.y.numpy(), num_partitions, partition_type, seed)
    return data.subset(parts[partition_id])


class NodeSettings:
    """The node's own settings (node config) over the run's defaults."""

    def __init__(self, node_config: Mapping, run: FederationConfig):
        node = dict(node_config)
        self.data = str(node.get("data") or run.client_data or run.dataset)
        self.data_root = str(node.get("data-root") or run.data_root)
        self.partition_id = int(node.get("partition-id", 0))
        self.num_partitions = int(node.get("num-partitions", 1))
        self.partition_type = str(node.get("partition-type") or run.partition_type)
        self.device = resolve_device(str(node.get("device") or "auto"))
        self.max_blocks = int(node.get("max-blocks", 0))
        self.memory_mb = float(node.get("memory-mb", 0))
        threads = int(node.get("threads", 0)) or run.client_threads
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.seed = run.seed
        self.name = node_identity(node)
        self.share_labels = str(node.get("share-labels", "1")).lower() not in ("0", "false", "no", "")

    def data_split(self, split: str) -> LabelledData:
        return local_data(self.data, self.data_root, split, self.partition_id, self.num_partitions,
                          self.partition_type, self.seed)


def node_identity(node_config: Mapping) -> str:
    """The node's stable identity: the node-name it was started with (noprop-client: --name, else its key's name),
    else its partition, which simulation numbers the same way in every run. It orders the node in the plan and
    seeds its training; Flower's node id, drawn at random per run, only addresses it."""
    name = str(node_config.get("node-name") or "").strip()
    if name:
        return name
    return f"partition-{int(node_config.get('partition-id', 0))}-of-{int(node_config.get('num-partitions', 1))}"


HELD_SHARE = 0.2  # a class counts as held when it has at least this fraction of an even share of the examples


def held_classes(y: torch.Tensor, num_classes: int) -> list[int]:
    """The classes that make up at least HELD_SHARE of an even share of these labels (2% of them for 10 classes,
    0.2% for 100): what discovery tells the planner. A set, not a histogram: the server learns which classes a
    node holds, not how many of each."""
    counts = torch.bincount(y.long().flatten(), minlength=num_classes)
    return [c for c in range(num_classes) if counts[c] > 0 and counts[c] >= HELD_SHARE * len(y) / num_classes]


def settings(run_config: Mapping, node_config: Mapping) -> tuple[FederationConfig, NodeSettings]:
    run = FederationConfig.from_run_config(dict(run_config))
    return run, NodeSettings(node_config, run)


def query(content: RecordDict, run_config: Mapping, node_config: Mapping, state: MutableMapping) -> RecordDict:
    """Discovery: this node's device, memory, how many blocks it can hold and how fast it trains one."""
    _, node = settings(run_config, node_config)
    cfg_record = content["config"]
    asked = QueryInstructions.from_record(cfg_record)
    model_cfg, batch_size = asked.model_config, asked.batch_size
    data = node.data_split("train")
    data.check_fits(model_cfg)
    cached = state.get("capacity")
    if isinstance(cached, ConfigRecord) and cached.get("model-config") == cfg_record["model-config"]:
        throughput = float(cached["throughput"])
    else:
        throughput = measure_throughput(model_cfg, data, node.device, batch_size)
        state["capacity"] = ConfigRecord({"model-config": cfg_record["model-config"], "throughput": throughput})
    budget = node.memory_mb or available_memory_mb(node.device)
    data_mb = data.x.numel() * data.x.element_size() / 2**20
    max_blocks = max_blocks_for_memory(model_cfg, batch_size, budget, data_mb)
    if node.max_blocks:
        max_blocks = min(max_blocks, node.max_blocks)
    reply = ConfigRecord({
        "device": node.device.type, "memory-mb": float(budget), "max-blocks": int(max_blocks),
        "throughput": float(throughput), "num-examples": len(data), "data": node.data,
        "name": node.name,
    })
    if node.share_labels:  # which classes it holds, no counts: the planner gives a block owners that differ
        reply["classes"] = held_classes(data.y, model_cfg.num_classes)
    return RecordDict({"capacity": reply})


def train(content: RecordDict, run_config: Mapping, node_config: Mapping, node_id: int) -> RecordDict:
    """Train what the message asks, with its method's trainer (METHODS: NoProp-DT's blocks, or a whole network),
    and send it back. The reply's metrics carry the handler's parts in seconds (time-data-s, and the trainer's),
    which the server records per round beside its own."""
    _, node = settings(run_config, node_config)
    instructions = TrainInstructions.from_record(content["config"])
    t0 = time.perf_counter()
    data = node.data_split("train")
    data.check_fits(instructions.model_config)
    t_data = time.perf_counter() - t0
    reply = load(method_named(instructions.method).trainer)(instructions, content, node, data)
    reply["metrics"]["time-data-s"] = t_data
    return reply


def train_blocks(ins: TrainInstructions, content: RecordDict, node: NodeSettings, data: LabelledData) -> RecordDict:
    """NoProp-DT's trainer: train the blocks in the message (each alone, on its own noised targets) and send back
    exactly the keys received."""
    model_cfg, blocks, rnd, seed = ins.model_config, list(ins.blocks), ins.round, ins.seed_for(node.name)
    if not blocks:
        raise ValueError("a NoProp-DT train message names no blocks")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    received = record_to_arrays(content["arrays"])
    model = NoPropDT(model_cfg, owned_blocks=blocks)
    model.load_state_dict(to_torch_state(received), strict=True)
    model.to(node.device)
    optim = OptimConfig(lr=ins.lr, weight_decay=ins.weight_decay, batch_size=ins.batch_size)
    trainer = BlockTrainer(model, optim)
    t_model = time.perf_counter() - t0
    # split-local-data: each of the k blocks trains on its own 1/k of the data (a round = one block-epoch)
    split = ins.split_local_data and len(blocks) > 1
    shares = split_among_blocks(data, blocks, seed) if split else {t: data for t in blocks}
    # the step floor counts the node's whole data: split among k blocks, it buys no k times the compute
    epochs = epochs_for_min_steps(len(data), optim.batch_size, ins.local_epochs, ins.min_local_steps)
    log_prior = label_log_prior(data.y, model_cfg.num_classes) if ins.logit_adjust else None
    print(f"round {rnd}: training block(s) {', '.join(map(str, blocks))} on {len(data)} examples"
          f"{f' split {len(blocks)} ways' if split else ''}, {epochs} epoch(s)", flush=True)
    start = time.perf_counter()
    losses = train_owned_blocks(trainer, blocks, shares, epochs, log_prior=log_prior)
    elapsed = time.perf_counter() - start
    print(f"round {rnd}: trained in {elapsed:.1f}s", flush=True)
    t0 = time.perf_counter()
    state = to_numpy_state(model.state_dict())
    arrays = arrays_to_record(state, list(received))
    # the round stamp lets the server refuse a reply that answers another round (late or replayed)
    metrics = {"round": rnd, "num-examples": len(data), "train-time-s": elapsed, "local-epochs": epochs,
               "samples-per-s-per-block": sum(len(d) for d in shares.values()) * epochs / elapsed,
               "time-model-s": t_model, "time-reply-s": time.perf_counter() - t0}
    for t, parts in losses.items():
        metrics[f"loss-block-{t}"] = float(parts["loss"])
        metrics[f"l2-block-{t}"] = float(parts["l2"])
    return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


def evaluate(content: RecordDict, run_config: Mapping, node_config: Mapping) -> RecordDict:
    """Accuracy of the network in the message (any method: NoProp-DT's assembled chain, or the one network) on this
    node's test split, read out as the server's evaluation reads it."""
    _, node = settings(run_config, node_config)
    asked = EvaluateInstructions.from_record(content["config"])
    data = node.data_split("test")
    data.check_fits(asked.model_config)
    model = build_model(asked.method, asked.model_config)
    model.load_state_dict(to_torch_state(record_to_arrays(content["arrays"])), strict=True)
    model.to(node.device)
    acc = evaluate_accuracy(model, data, asked.eval_mode, seed=asked.seed)
    return RecordDict({"metrics": MetricRecord({"accuracy": acc, "num-examples": len(data)})})


def handle(kind: str, content: RecordDict, run_config: Mapping, node_config: Mapping, state: MutableMapping,
           node_id: int) -> RecordDict:
    """The reply to one message by its kind (query, train or evaluate): the one dispatch of the ClientApp's own
    process and of the warm worker alike."""
    if kind == "query":
        return query(content, run_config, node_config, state)
    if kind == "train":
        return train(content, run_config, node_config, node_id)
    if kind == "evaluate":
        return evaluate(content, run_config, node_config)
    raise ValueError(f"unknown message kind {kind!r} (expected query, train or evaluate)")


def preload(run_config: Mapping, node_config: Mapping) -> LabelledData:
    """Load and partition the node's training data once (the warm worker does this before its first message)."""
    return settings(run_config, node_config)[1].data_split("train")

