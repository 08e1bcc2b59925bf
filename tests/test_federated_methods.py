"""The one-network methods (NoProp-CT, NoProp-FM, adjoint, backprop) in a federation: FedAvg of the whole network.

The ClientApp's train handler is called with a constructed FedAvg message. NoProp-FM in noprop-sim, through
Flower's own FedAvg strategy with a stop and a resume, is in tests/test_sim.py (with every other Ray run).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict
from test_client_app import context, instruction, npz, task_identity  # noqa: F401 - fixtures

from noprop.client.app import make_client_app
from noprop.federation import FederationConfig
from noprop.methods import build_model
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state


def fedavg_message(method: str, model_cfg, state: dict, epochs: int = 1):
    config = ConfigRecord({"method": method, "model-config": json.dumps(model_cfg.to_dict()), "local-epochs": epochs,
                           "lr": 3e-3, "weight-decay": 0.0, "batch-size": 32, "seed": 0, "round": 1})
    return instruction(RecordDict({"arrays": arrays_to_record(state), "config": config}), MessageType.TRAIN)


@pytest.mark.parametrize("method", ["ct", "fm"])
def test_client_trains_the_whole_network_and_returns_every_key(npz, method):  # noqa: F811
    cfg = FederationConfig(method=method, channels="8,16,16", hidden=32, dropout=0.0, steps=4)
    model_cfg = cfg.model_config((1, 12, 12), 4)
    state = to_numpy_state(build_model(method, model_cfg).state_dict())
    reply = make_client_app()(fedavg_message(method, model_cfg, state), context(npz))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    got = record_to_arrays(reply.content["arrays"])
    assert set(got) == set(state)  # the whole network: no blocks to own
    changed = [k for k in state if state[k].dtype.kind == "f" and not np.array_equal(got[k], state[k])]
    assert len(changed) > len(state) // 2, f"only {len(changed)} of {len(state)} tensors were trained"
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 300 and np.isfinite(metrics["train-loss"])


def test_federation_config_rejects_unknown_method_and_bad_solver():
    with pytest.raises(ValueError, match="method"):
        FederationConfig(method="ddpm").validate()
    with pytest.raises(ValueError, match="solver"):
        FederationConfig(method="fm", solver="rk4").validate()
    assert FederationConfig(method="ct").model_config((1, 12, 12), 4).eta == 1.0  # the method's own default
    assert FederationConfig().model_config((1, 12, 12), 4).eta == 0.1


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_fedavg_rejects_tampered_replies_by_node_id(aggregation):
    """The FedAvg path checks replies like block owners' before Flower's strategy combines them, and the strategy
    combines the honest rest by its own rule: three different honest replies with different example counts give
    an example-weighted mean, a median, an unweighted mean and "the first reply" four different values."""
    from flwr.app import Message, MetricRecord

    from noprop.server.fedavg import checked_strategy

    cfg = FederationConfig(method="fm", channels="8,16,16", hidden=32, aggregation=aggregation)
    model_cfg = cfg.model_config((1, 12, 12), 4)
    state = to_numpy_state(build_model("fm", model_cfg).state_dict())
    strategy = checked_strategy(cfg, log=lambda line: None)
    sent = {node: instruction(RecordDict({"arrays": arrays_to_record(state), "config": ConfigRecord({})}),
                              MessageType.TRAIN) for node in (11, 12, 13, 14, 15, 16)}
    for node, msg in sent.items():
        msg.metadata.__dict__["_dst_node_id"] = node
    strategy.begin_round(3, arrays_to_record(state), list(sent.values()))

    def reply(node: int, arrays: dict, rnd: int = 3, count: int = 100) -> Message:
        out = Message(RecordDict({"arrays": arrays_to_record(arrays),
                                  "metrics": MetricRecord({"round": rnd, "num-examples": count})}),
                      reply_to=sent[node])
        out.metadata.__dict__["_src_node_id"] = node
        return out

    key = next(k for k in state if k.startswith("block.") and state[k].dtype == np.float32)
    offsets, counts = (0.01, 0.02, 0.06), (100, 300, 50)
    honest = [{**state, key: state[key] + np.float32(offset)} for offset in offsets]
    boosted = {**honest[0], key: honest[0][key] * np.float32(1e4) + np.float32(1e3)}
    missing = {k: v for k, v in honest[0].items() if k != key}
    arrays, _ = strategy.aggregate_train(3, [
        reply(11, honest[0], count=counts[0]), reply(12, honest[1], count=counts[1]), reply(13, boosted),
        reply(14, honest[2], count=counts[2]), reply(15, honest[0], rnd=2), reply(16, missing)])
    rejected = strategy.round_record["rejected"]
    assert set(rejected) == {"13", "15", "16"}, rejected
    assert "beyond the bound" in rejected["13"] and "round 2" in rejected["15"] and "missing" in rejected["16"]
    assert strategy.round_record["num_examples"] == {"11": 100, "12": 300, "14": 50}
    stacked = np.stack([h[key].astype(np.float64) for h in honest])
    rules = {"mean": np.average(stacked, axis=0, weights=counts),  # Flower's FedAvg weighs by num-examples
             "median": np.median(stacked, axis=0),  # FedMedian: coordinate-wise, counts play no part
             "unweighted mean": stacked.mean(axis=0), "first reply": stacked[0]}
    got = record_to_arrays(arrays)[key]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, rules[aggregation], rtol=0, atol=1e-6)  # only the honest replies count
    for name, value in rules.items():
        if name != aggregation:
            assert np.abs(got - value).max() > 1e-3, f"{aggregation} combined the replies like the {name}"
