"""The messages' instructions (noprop.protocol): what the server encodes is what the node decodes, a bad message
names its key, and every method's nodes draw their seeds by one rule."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from noprop.federation import FederationConfig
from noprop.protocol import EvaluateInstructions, ProtocolError, QueryInstructions, TrainInstructions
from noprop.trainer import node_seed


def instructions(method: str = "dt", **settings) -> TrainInstructions:
    cfg = FederationConfig(method=method, channels="4,8,8", hidden=16, lr=3e-3, seed=7, min_local_steps=12,
                           **settings)
    return TrainInstructions.for_run(cfg, cfg.model_config((1, 12, 12), 4))


@pytest.mark.parametrize("method", ["dt", "cnn", "ct"])
def test_train_instructions_decode_to_what_was_encoded(method):
    sent = instructions(method, split_local_data=True).for_node(3, (1, 2) if method == "dt" else (), "node-a")
    got = TrainInstructions.from_record(ConfigRecord(dict(sent.to_record())))
    assert got == sent
    assert (got.method, got.round, got.run_seed, got.lr, got.min_local_steps) == (method, 3, 7, 3e-3, 12)
    assert got.model_config.to_dict() == sent.model_config.to_dict()


def test_the_run_settings_travel_once_in_the_message():
    """Every setting a node trains by is in the TRAIN message, so a node needs no run config to train."""
    record = instructions("dt", logit_adjust=False).to_record()
    for key in ("method", "model-config", "round", "seed", "local-epochs", "lr", "weight-decay", "batch-size",
                "min-local-steps", "logit-adjust", "split-local-data", "blocks", "node-name"):
        assert key in record, key
    assert record["logit-adjust"] is False and record["min-local-steps"] == 12


def test_one_seed_rule_for_every_method():
    """A node seeds round r by the run seed, r and the name it is planned under, else its own name; two nodes or
    two rounds never share a seed."""
    planned = instructions("dt").for_node(4, (1,), "partition-1-of-3@17")
    assert planned.seed_for("partition-1-of-3") == node_seed(7, 4, "partition-1-of-3@17")  # the server's name wins
    fedavg = instructions("cnn").for_node(4)
    assert fedavg.seed_for("partition-1-of-3") == node_seed(7, 4, "partition-1-of-3")
    seeds = {instructions("cnn").for_node(r).seed_for(f"n{i}") for r in (1, 2) for i in range(3)}
    assert len(seeds) == 6


@pytest.mark.parametrize(("key", "value", "message"), [
    ("method", None, "no 'method'"),
    ("round", None, "no 'round'"),
    ("lr", "fast", "'lr' is 'fast', not a float"),
    ("round", "3", "'round' is '3', not a int"),
    ("model-config", "{", "model-config cannot be read"),
    ("method", "nope", "model-config cannot be read for method 'nope'"),
])
def test_a_bad_train_message_names_its_key(key, value, message):
    record = dict(instructions().for_node(1, (1,)).to_record())
    if value is None:
        del record[key]
    else:
        record[key] = value
    with pytest.raises(ProtocolError, match=message):
        TrainInstructions.from_record(ConfigRecord(record))


def test_evaluate_and_query_instructions_round_trip():
    ins = instructions("cnn")
    sent = EvaluateInstructions("cnn", ins.model_config, "deterministic", 5)
    assert EvaluateInstructions.from_record(sent.to_record()) == sent
    dt = instructions("dt").model_config
    query = QueryInstructions.from_record(QueryInstructions(dt, 64).to_record())
    assert query.batch_size == 64 and query.model_config == dt
    with pytest.raises(ProtocolError, match="no 'method'"):
        EvaluateInstructions.from_record(ConfigRecord({"model-config": "{}"}))
