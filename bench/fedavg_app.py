"""Plain FedAvg of the backprop baseline: the comparison bench/federated.py measures noprop-fl against.

Every node trains the *whole* network (noprop.baseline.BackpropChain: the same blocks, embedding and head as
NoPropDT, trained end to end with one backward pass) on its local data, and the server averages everything with
Flower's own ``flwr.serverapp.strategy.FedAvg`` (Message API). The ServerApp runs in the same Flower
simulation engine as noprop-fl, with the same run config keys (noprop.federation.FederationConfig) and the
same client data (noprop.client.app.NodeSettings, so partitions are identical), so the bytes, the memory and
the accuracy compare like with like.

Per round it appends a line to OUT/metrics.jsonl with the same keys noprop-fl's server writes where they
exist: round, accuracy, bytes_to and bytes_from per node (ArrayRecord.count_bytes() of the real messages),
num_examples, round_time_s; and OUT/DONE.json with the final accuracy.

Extra run-config key (not in FederationConfig): ``max-batches`` (int, 0 = whole local epochs) stops a
client's local training after that many minibatches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from noprop.baseline import BackpropChain
from noprop.client.handlers import NodeSettings
from noprop.data import load_dataset
from noprop.federation import FederationConfig
from noprop.io import append_jsonl, atomic_write_text
from noprop.model_configs import NoPropConfig
from noprop.trainer import evaluate_accuracy


def run_config(context: Context, overrides: dict | None) -> tuple[FederationConfig, int]:
    merged = {**dict(context.run_config), **(overrides or {})}
    return FederationConfig.from_run_config(merged), int(merged.get("max-batches", 0))


# -- server ----------------------------------------------------------------------------------------------


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg, recording the bytes of each ArrayRecord it sends and receives, per node."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bytes_to: dict[str, int] = {}
        self.bytes_from: dict[str, int] = {}
        self.num_examples: dict[str, int] = {}
        self.train_time: dict[str, float] = {}
        self.train_loss: dict[str, float] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.bytes_to = {str(m.metadata.dst_node_id): m.content[self.arrayrecord_key].count_bytes() for m in msgs}
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.bytes_from, self.num_examples, self.train_time, self.train_loss = {}, {}, {}, {}
        for msg in replies:
            if msg.has_error():
                print(f"fedavg: node {msg.metadata.src_node_id}: {msg.error.reason}", flush=True)
                continue
            node = str(msg.metadata.src_node_id)
            self.bytes_from[node] = msg.content[self.arrayrecord_key].count_bytes()
            metrics = msg.content["metrics"]
            self.num_examples[node] = int(metrics["num-examples"])
            self.train_time[node] = round(float(metrics["train-time-s"]), 2)
            self.train_loss[node] = round(float(metrics["train-loss"]), 4)
        return super().aggregate_train(server_round, replies)


def run_fedavg(grid: Grid, cfg: FederationConfig, max_batches: int = 0, log=print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    eval_data = load_dataset(cfg.dataset, split="test", root=cfg.data_root or None)
    model_cfg = cfg.model_config(eval_data.input_shape, eval_data.num_classes)
    torch.manual_seed(cfg.seed)
    model = BackpropChain(model_cfg)
    strategy = MeasuredFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_nodes,
                              min_available_nodes=cfg.min_nodes)
    train_config = ConfigRecord({
        "local-epochs": cfg.local_epochs, "lr": cfg.lr, "weight-decay": cfg.weight_decay,
        "batch-size": cfg.batch_size, "seed": cfg.seed, "max-batches": max_batches,
        "model-config": json.dumps(model_cfg.to_dict()),
    })

    def evaluate(data_limit: int) -> float:
        data = eval_data if not data_limit else eval_data.subset(range(min(data_limit, len(eval_data))))
        return evaluate_accuracy(model, data, cfg.eval_mode, seed=cfg.seed)

    clock = {"start": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower evaluates the initial model too: not needed here
            clock["start"] = time.perf_counter()
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        acc = evaluate(cfg.eval_limit)
        record = {"round": server_round, "accuracy": acc, "bytes_to": dict(strategy.bytes_to),
                  "bytes_from": dict(strategy.bytes_from), "num_examples": dict(strategy.num_examples),
                  "client_train_time_s": dict(strategy.train_time), "client_train_loss": dict(strategy.train_loss),
                  "round_time_s": round(time.perf_counter() - clock["start"], 2)}
        append_jsonl(metrics_path, record)
        log(f"fedavg round {server_round}/{cfg.num_rounds}  accuracy {100 * acc:.2f}%  "
            f"{record['round_time_s']:.1f}s")
        clock["start"] = time.perf_counter()
        return MetricRecord({"accuracy": acc})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
                            timeout=cfg.round_timeout, train_config=train_config, evaluate_fn=evaluate_fn)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    final = evaluate(cfg.final_eval_limit)
    done = {"rounds": cfg.num_rounds, "accuracy": final, "eval_examples": cfg.final_eval_limit or len(eval_data),
            "eval_mode": cfg.eval_mode}
    atomic_write_text(out / "DONE.json", json.dumps(done, indent=2))
    log(f"fedavg done: final accuracy {100 * final:.2f}% on {done['eval_examples']} test examples")
    return done


def make_fedavg_server_app(overrides: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, max_batches = run_config(context, overrides)
        run_fedavg(grid, cfg, max_batches, log=lambda line: print(line, flush=True))

    return app


# -- client ----------------------------------------------------------------------------------------------


def train_backprop(model: BackpropChain, optimizer: torch.optim.Optimizer, data, batch_size: int, epochs: int,
                   max_batches: int = 0) -> tuple[float, int]:
    """End-to-end training for the given local epochs (at most max_batches minibatches when > 0).

    A last minibatch of a single example is skipped: BatchNorm cannot train on it.
    """
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        for x, y in data.batches(batch_size, shuffle=True):
            if len(y) < 2:
                continue
            loss = model.loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
            if max_batches and steps >= max_batches:
                return total / steps, steps
    return total / max(steps, 1), steps


def make_fedavg_client_app(overrides: dict | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run, _ = run_config(context, overrides)
        node = NodeSettings(context.node_config, run)  # the same data and partition as noprop-fl's client
        config = msg.content["config"]
        model_cfg = NoPropConfig.from_dict(json.loads(str(config["model-config"])))
        data = node.data_split("train")
        data.check_fits(model_cfg)
        torch.manual_seed(int(config["seed"]) * 100_003 + int(config["server-round"]))
        model = BackpropChain(model_cfg)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(config["lr"]),
                                      weight_decay=float(config["weight-decay"]))
        start = time.perf_counter()
        loss, steps = train_backprop(model, optimizer, data, int(config["batch-size"]), int(config["local-epochs"]),
                                     int(config["max-batches"]))
        metrics = MetricRecord({"num-examples": len(data), "train-loss": float(loss), "steps": steps,
                                "train-time-s": time.perf_counter() - start})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    return app
