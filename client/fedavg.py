"""A node's turn in a FedAvg round of a one-network method (NoProp-CT, NoProp-FM, adjoint, backprop, cnn): train the
whole network it was sent on the local data for the round's epochs, with the method's own optimizer, and send
it back with the same keys."""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from noprop.data import LabelledData
from noprop.methods import build_model, config_from_dict, make_optimizer
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state, to_torch_state
from noprop.trainer import epochs_for_min_steps, node_seed, train_end_to_end_epoch


def train_whole_network(content: RecordDict, identity: str | int, data: LabelledData,
                        device: torch.device) -> RecordDict:
    """The reply to a FedAvg train message: the trained network and num-examples, train-loss, train-time-s."""
    config = content["config"]
    method = str(config["method"])
    model_cfg = config_from_dict(method, json.loads(str(config["model-config"])))
    data.check_fits(model_cfg)
    rnd = int(config["round"])  # the run's own round number, after a resume too (the key DT's messages use)
    torch.manual_seed(node_seed(int(config["seed"]), rnd, identity))  # the node's name, stable across runs
    received = record_to_arrays(content["arrays"])
    model = build_model(method, model_cfg)
    model.load_state_dict(to_torch_state(received), strict=True)
    model.to(device)
    optimizer = make_optimizer(method, model.parameters(), float(config["lr"]), float(config["weight-decay"]))
    batch_size = int(config["batch-size"])
    epochs = epochs_for_min_steps(len(data), batch_size, int(config["local-epochs"]),
                                  int(config.get("min-local-steps", 0)))
    start = time.perf_counter()
    losses = [train_end_to_end_epoch(model, optimizer, data, batch_size).get("loss", float("nan"))
              for _ in range(epochs)]
    metrics = MetricRecord({"round": rnd, "num-examples": len(data), "train-loss": float(losses[-1]),
                            "local-epochs": epochs, "train-time-s": time.perf_counter() - start})
    # the node's identity travels with the reply: the server sums replies in that order, the same in every run
    identity_record = ConfigRecord({"name": str(identity)})
    state = to_numpy_state(model.state_dict())
    return RecordDict({"arrays": arrays_to_record(state, list(received)), "metrics": metrics,
                       "identity": identity_record})
