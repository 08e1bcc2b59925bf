"""A node's turn in a FedAvg round of a one-network method (NoProp-CT, NoProp-FM, adjoint, backprop, cnn): train the
whole network it was sent on the local data for the round's epochs, with the method's own optimizer, and send
it back with the same keys."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from noprop.data import LabelledData
from noprop.methods import build_model, make_optimizer
from noprop.protocol import TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state, to_torch_state
from noprop.trainer import epochs_for_min_steps, train_end_to_end_epoch

if TYPE_CHECKING:
    from noprop.client.handlers import NodeSettings


def train_whole_network(ins: TrainInstructions, content: RecordDict, node: NodeSettings,
                        data: LabelledData) -> RecordDict:
    """The reply to a FedAvg train message: the trained network and num-examples, train-loss, train-time-s."""
    torch.manual_seed(ins.seed_for(node.name))  # the node's name, stable across runs
    received = record_to_arrays(content["arrays"])
    model = build_model(ins.method, ins.model_config)
    model.load_state_dict(to_torch_state(received), strict=True)
    model.to(node.device)
    optimizer = make_optimizer(ins.method, model.parameters(), ins.lr, ins.weight_decay)
    batch_size, rnd = ins.batch_size, ins.round
    epochs = epochs_for_min_steps(len(data), batch_size, ins.local_epochs, ins.min_local_steps)
    start = time.perf_counter()
    losses = [train_end_to_end_epoch(model, optimizer, data, batch_size).get("loss", float("nan"))
              for _ in range(epochs)]
    metrics = MetricRecord({"round": rnd, "num-examples": len(data), "train-loss": float(losses[-1]),
                            "local-epochs": epochs, "train-time-s": time.perf_counter() - start})
    # the node's identity travels with the reply: the server sums replies in that order, the same in every run
    identity_record = ConfigRecord({"name": node.name})
    state = to_numpy_state(model.state_dict())
    return RecordDict({"arrays": arrays_to_record(state, list(received)), "metrics": metrics,
                       "identity": identity_record})
