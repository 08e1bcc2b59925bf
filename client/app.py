"""The noprop-fl ClientApp: answer discovery, train the blocks it is given, evaluate the assembled chain.
For the one-network methods (ct, fm, adjoint, backprop) a train message carries the whole network (FedAvg).

A node builds only the blocks it was sent (plus the shared embedding and head): it never holds a block it
does not own while training, and it replies with exactly the keys it received.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from noprop.client.capacity import available_memory_mb, max_blocks_for_memory, measure_throughput
from noprop.client.fedavg import train_whole_network
from noprop.data import LabelledData, load_dataset, partition
from noprop.device import resolve_device
from noprop.federation import FederationConfig
from noprop.model import NoPropConfig, NoPropDT
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

    def __init__(self, context: Context, run: FederationConfig):
        node = dict(context.node_config)
        self.data = str(node.get("data") or run.client_data or run.dataset)
        self.data_root = str(node.get("data-root") or run.data_root)
        self.partition_id = int(node.get("partition-id", 0))
        self.num_partitions = int(node.get("num-partitions", 1))
        self.partition_type = str(node.get("partition-type") or run.partition_type)
        self.device = resolve_device(str(node.get("device") or "auto"))
        self.max_blocks = int(node.get("max-blocks", 0))
        self.memory_mb = float(node.get("memory-mb", 0))
        threads = int(node.get("threads", 0)) or run.client_threads
        if threads:
            torch.set_num_threads(threads)
        self.seed = run.seed

    def data_split(self, split: str) -> LabelledData:
        return local_data(self.data, self.data_root, split, self.partition_id, self.num_partitions,
                          self.partition_type, self.seed)


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; overrides stand in for run config where Flower passes none (simulation)."""
    app = ClientApp()

    def settings(context: Context) -> tuple[FederationConfig, NodeSettings]:
        run = FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        return run, NodeSettings(context, run)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        run, node = settings(context)
        cfg_record = msg.content["config"]
        model_cfg = NoPropConfig.from_dict(json.loads(str(cfg_record["model-config"])))
        batch_size = int(cfg_record["batch-size"])
        data = node.data_split("train")
        check_compatible(data, model_cfg)
        cached = context.state.get("capacity")
        if isinstance(cached, ConfigRecord) and cached.get("model-config") == cfg_record["model-config"]:
            throughput = float(cached["throughput"])
        else:
            throughput = measure_throughput(model_cfg, data, node.device, batch_size)
            context.state["capacity"] = ConfigRecord({"model-config": cfg_record["model-config"],
                                                      "throughput": throughput})
        budget = node.memory_mb or available_memory_mb(node.device)
        data_mb = data.x.numel() * data.x.element_size() / 2**20
        max_blocks = max_blocks_for_memory(model_cfg, batch_size, budget, data_mb)
        if node.max_blocks:
            max_blocks = min(max_blocks, node.max_blocks)
        reply = ConfigRecord({
            "device": node.device.type, "memory-mb": float(budget), "max-blocks": int(max_blocks),
            "throughput": float(throughput), "num-examples": len(data), "data": node.data,
        })
        return Message(RecordDict({"capacity": reply}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run, node = settings(context)
        cfg_record = msg.content["config"]
        if str(cfg_record.get("method", "dt")) != "dt":  # a one-network method: FedAvg of the whole network
            return train_whole_network(msg, node.data_split("train"), node.device)
        model_cfg = NoPropConfig.from_dict(json.loads(str(cfg_record["model-config"])))
        blocks = [int(b) for b in cfg_record["blocks"]]
        data = node.data_split("train")
        check_compatible(data, model_cfg)
        torch.manual_seed(int(cfg_record["seed"]))
        received = record_to_arrays(msg.content["arrays"])
        model = NoPropDT(model_cfg, owned_blocks=blocks)
        model.load_state_dict(to_torch_state(received), strict=True)
        model.to(node.device)
        optim = OptimConfig(lr=float(cfg_record["lr"]), weight_decay=float(cfg_record["weight-decay"]),
                            batch_size=int(cfg_record["batch-size"]))
        trainer = BlockTrainer(model, optim)
        rnd = int(cfg_record["round"])
        # split-local-data: each of the k blocks trains on its own 1/k of the data (a round = one block-epoch)
        split = bool(cfg_record.get("split-local-data")) and len(blocks) > 1
        shares = split_among_blocks(data, blocks, int(cfg_record["seed"])) if split else {t: data for t in blocks}
        # the step floor counts the node's whole data: split among k blocks, it buys no k times the compute
        epochs = epochs_for_min_steps(len(data), optim.batch_size, int(cfg_record["local-epochs"]),
                                      int(cfg_record.get("min-local-steps", 0)))
        log_prior = label_log_prior(data.y, model_cfg.num_classes) if bool(cfg_record.get("logit-adjust")) else None
        print(f"round {rnd}: training block(s) {', '.join(map(str, blocks))} on {len(data)} examples"
              f"{f' split {len(blocks)} ways' if split else ''}, {epochs} epoch(s)", flush=True)
        start = time.perf_counter()
        losses = train_owned_blocks(trainer, blocks, shares, epochs, log_prior=log_prior)
        elapsed = time.perf_counter() - start
        print(f"round {rnd}: trained in {elapsed:.1f}s", flush=True)
        state = to_numpy_state(model.state_dict())
        # the round stamp lets the server refuse a reply that answers another round (late or replayed)
        metrics = {"round": rnd, "num-examples": len(data), "train-time-s": elapsed,
                   "local-epochs": epochs,
                   "samples-per-s-per-block": sum(len(d) for d in shares.values()) * epochs / elapsed}
        for t, parts in losses.items():
            metrics[f"loss-block-{t}"] = float(parts["loss"])
            metrics[f"l2-block-{t}"] = float(parts["l2"])
        content = RecordDict({"arrays": arrays_to_record(state, list(received)), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run, node = settings(context)
        cfg_record = msg.content["config"]
        model_cfg = NoPropConfig.from_dict(json.loads(str(cfg_record["model-config"])))
        data = node.data_split("test")
        check_compatible(data, model_cfg)
        model = NoPropDT(model_cfg)
        model.load_state_dict(to_torch_state(record_to_arrays(msg.content["arrays"])), strict=True)
        model.to(node.device)
        acc = evaluate_accuracy(model, data, str(cfg_record["eval-mode"]), seed=run.seed)
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": acc, "num-examples": len(data)})}),
                       reply_to=msg)

    return app


def check_compatible(data: LabelledData, cfg: NoPropConfig) -> None:
    if tuple(data.input_shape) != tuple(cfg.input_shape) or data.num_classes != cfg.num_classes:
        raise ValueError(f"this node's data {data.name} has input {tuple(data.input_shape)} and "
                         f"{data.num_classes} classes, the run's model expects {tuple(cfg.input_shape)} and "
                         f"{cfg.num_classes}: point --data at the same kind of data as the server's")


app = make_client_app()
