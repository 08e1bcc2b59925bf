"""BlockOwnershipStrategy's own checks, driven with constructed Flower messages (no processes): discovery
answers (accepted and stored, or rejected and skipped) and train replies (read_reply, then
aggregate_train: a bad reply is rejected by node id and counts for nothing, the good one counts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from test_client_app import task_identity  # noqa: F401 - fixture

from noprop.federation import FederationConfig
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.protocol import TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, state_digest, to_numpy_state
from noprop.server.aggregate import Expected, read_reply
from noprop.server.block_strategy import BlockOwnershipStrategy

MODEL = NoPropConfig(input_shape=(1, 12, 12), num_classes=4, T=2, channels=(4, 8, 8), hidden=16, dropout=0.0)
GOOD = {"max-blocks": 2, "throughput": 500.0, "num-examples": 100, "device": "cpu", "memory-mb": 1000.0,
        "data": "npz:task"}


def delivered(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does on push
    return msg


class ScriptedGrid:
    """The Grid calls the strategy makes, answered by ``answer(message) -> reply content or Error``."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer, self.sent = list(nodes), answer, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            delivered(msg)
            self.sent.append(msg)
            out = self.answer(msg)
            if isinstance(out, Error) or out is not None:
                replies.append(Message(out, reply_to=msg))
        return replies


def strategy(log: list[str]) -> BlockOwnershipStrategy:
    cfg = FederationConfig(T=MODEL.T, min_nodes=1, channels="4,8,8", hidden=16, dropout=0.0, head_steps=0,
                           max_value_ratio=1000.0)
    torch.manual_seed(0)
    return BlockOwnershipStrategy(cfg, MODEL, NoPropDT(MODEL), log=log.append)


def capacity_answer(by_node: dict[int, dict | None]):
    def answer(msg):
        assert msg.metadata.message_type == MessageType.QUERY
        assert json.loads(msg.content["config"]["model-config"]) == json.loads(json.dumps(MODEL.to_dict()))
        c = by_node[msg.metadata.dst_node_id]
        return None if c is None else RecordDict({"capacity": ConfigRecord(c)})
    return answer


def test_a_good_discovery_answer_is_stored_and_an_extra_field_is_tolerated():
    log: list[str] = []
    s = strategy(log)
    s.grid = ScriptedGrid([7, 8], capacity_answer({7: GOOD, 8: {**GOOD, "name": "client-8", "num-examples": 40,
                                                                "throughput": 123.5, "max-blocks": 1}}))
    s.discover([7, 8], 1)
    assert set(s.capacities) == {7, 8}, log
    c7, c8 = s.capacities[7], s.capacities[8]
    assert (c7.node_id, c7.max_blocks, c7.throughput, c7.num_examples, c7.device) == (7, 2, 500.0, 100, "cpu")
    assert (c8.max_blocks, c8.throughput, c8.num_examples) == (1, 123.5, 40)
    assert not any("rejected" in line for line in log), log
    # known nodes are not asked again; a node that is gone is forgotten
    asked = len(s.grid.sent)
    s.discover([8], 2)
    assert set(s.capacities) == {8} and len(s.grid.sent) == asked


BAD_ANSWERS = {
    "no-throughput": {k: v for k, v in GOOD.items() if k != "throughput"},
    "no-max-blocks": {k: v for k, v in GOOD.items() if k != "max-blocks"},
    "no-num-examples": {k: v for k, v in GOOD.items() if k != "num-examples"},
    "zero-throughput": {**GOOD, "throughput": 0.0},
    "negative-throughput": {**GOOD, "throughput": -5.0},
    "infinite-throughput": {**GOOD, "throughput": math.inf},
    "nan-throughput": {**GOOD, "throughput": math.nan},
    "zero-max-blocks": {**GOOD, "max-blocks": 0},
    "zero-examples": {**GOOD, "num-examples": 0},
    "throughput-a-word": {**GOOD, "throughput": "fast"},
    "max-blocks-a-word": {**GOOD, "max-blocks": "many"},
    "examples-a-list": {**GOOD, "num-examples": [1, 2]},
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_malformed_discovery_answer_is_rejected_and_the_node_skipped(case):
    log: list[str] = []
    s = strategy(log)
    s.grid = ScriptedGrid([7, 8], capacity_answer({7: GOOD, 8: BAD_ANSWERS[case]}))
    s.discover([7, 8], 1)
    assert set(s.capacities) == {7}, (case, s.capacities)  # the good node still counts
    assert any(line.startswith("node 8: discovery reply rejected") for line in log), log


def test_a_discovery_answer_without_a_capacity_record_or_with_an_error_is_skipped():
    log: list[str] = []
    s = strategy(log)
    answers = {7: RecordDict({"capacity": ConfigRecord(GOOD)}), 8: RecordDict({"config": ConfigRecord({"a": 1})}),
               9: Error(code=0, reason="node unavailable")}
    s.grid = ScriptedGrid([7, 8, 9], lambda msg: answers[msg.metadata.dst_node_id])
    s.discover([7, 8, 9], 1)
    assert set(s.capacities) == {7}
    assert any(line.startswith("node 8: discovery reply rejected") for line in log), log
    assert any(line.startswith("node 9: discovery failed: node unavailable") for line in log), log


# -- train replies --------------------------------------------------------------------------------------------


def train_reply_content(msg: Message, metrics: dict | None = None, change=None) -> RecordDict:
    """An honest-looking reply to a train message: every tensor sent back nudged, the metrics a client sends."""
    arrays = {k: (v + 0.01).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
              for k, v in record_to_arrays(msg.content["arrays"]).items()}
    if change:
        change(arrays)
    config = msg.content["config"]
    if metrics is None:
        metrics = {"num-examples": 100, "round": int(config["round"]),
                   **{f"l2-block-{t}": 0.5 for t in config["blocks"]}}
    content = RecordDict({"arrays": arrays_to_record(arrays)})
    if metrics != "none":
        content["metrics"] = MetricRecord(metrics)
    return content


def block_key(arrays: dict, t: int) -> str:
    return next(k for k in arrays if k.startswith(f"blocks.{t}.") and np.issubdtype(arrays[k].dtype, np.floating))


def set_value(t: int, value: float):
    def change(arrays):
        key = block_key(arrays, t)
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = value
    return change


BAD_REPLIES = {  # node 8's reply, given its one block t: (content maker, reason)
    "plus-inf": (lambda msg, t: train_reply_content(msg, change=set_value(t, math.inf)), "non-finite values"),
    "minus-inf": (lambda msg, t: train_reply_content(msg, change=set_value(t, -math.inf)), "non-finite values"),
    "nan": (lambda msg, t: train_reply_content(msg, change=set_value(t, math.nan)), "non-finite values"),
    "no-metrics": (lambda msg, t: train_reply_content(msg, metrics="none"), "malformed reply"),
    "no-block-loss": (lambda msg, t: train_reply_content(msg, metrics={"num-examples": 100, "round": 1}),
                      "malformed reply: metrics l2-block-"),
    "no-arrays": (lambda msg, t: RecordDict({"metrics": MetricRecord({"num-examples": 100, "round": 1,
                                                                      f"l2-block-{t}": 0.5})}), "malformed reply"),
    "no-example-count": (lambda msg, t: train_reply_content(msg, metrics={"round": 1, f"l2-block-{t}": 0.5}),
                         "num-examples None"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_a_bad_train_reply_is_rejected_by_node_id_and_counts_for_nothing(case):
    log: list[str] = []
    s = strategy(log)
    one_block = {**GOOD, "max-blocks": 1}
    make_bad, reason = BAD_REPLIES[case]

    def answer(msg):
        if msg.metadata.message_type == MessageType.QUERY:
            return RecordDict({"capacity": ConfigRecord(one_block)})
        t = int(msg.content["config"]["blocks"][0])
        return make_bad(msg, t) if msg.metadata.dst_node_id == 8 else train_reply_content(msg)

    grid = ScriptedGrid([7, 8], answer)
    start = to_numpy_state(s.model.state_dict())
    config = TrainInstructions.for_run(s.cfg, MODEL).to_record()
    msgs = list(s.configure_train(1, arrays_to_record(start), config, grid))
    blocks = {m.metadata.dst_node_id: int(m.content["config"]["blocks"][0]) for m in msgs}
    assert sorted(blocks) == [7, 8] and sorted(blocks.values()) == [1, 2], blocks
    replies = grid.send_and_receive(msgs)
    arrays, _ = s.aggregate_train(1, replies)
    record = s.round_record
    assert set(record["rejected"]) == {"8"} and reason in record["rejected"]["8"], record["rejected"]
    assert any(line.startswith(f"node 8: reply rejected: {record['rejected']['8']}") for line in log), log
    assert record["trained_by"] == [7] and set(record["block_l2"]) == {str(blocks[7])}, record
    after = record_to_arrays(arrays)
    bad, good = blocks[8], blocks[7]
    for key, value in after.items():
        if key.startswith(f"blocks.{bad}."):  # the rejected node's block kept its weights, bit for bit
            assert np.array_equal(value, start[key]), key
        elif np.issubdtype(value.dtype, np.floating):  # the good reply alone makes its block and the shared tensors
            assert np.array_equal(value, (start[key] + 0.01).astype(value.dtype)), key
    assert all(np.isfinite(v).all() for v in after.values() if np.issubdtype(v.dtype, np.floating))
    assert good != bad and state_digest(after) != state_digest(start)


def test_read_reply_reads_the_round_stamp_and_the_parts():
    state = to_numpy_state(NoPropDT(MODEL).state_dict())
    msg = delivered(Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"round": 3, "blocks": [2]})}),
                            dst_node_id=7, message_type=MessageType.TRAIN))
    content = RecordDict({"arrays": arrays_to_record(state),
                          "metrics": MetricRecord({"num-examples": 42, "round": 3, "l2-block-2": 0.25})})
    reply, problem = read_reply(Message(content, reply_to=msg), Expected(7, tuple(state), ("l2-block-2",)))
    assert problem is None and reply.node_id == 7 and reply.num_examples == 42 and reply.round == 3
    assert set(reply.arrays) == set(state) and reply.metrics["l2-block-2"] == 0.25
    content["metrics"] = MetricRecord({"num-examples": 42, "round": 3.0, "l2-block-2": 0.25})
    reply, problem = read_reply(Message(content, reply_to=msg), Expected(7, tuple(state), ("l2-block-2",)))
    assert problem is None and reply.round is None  # a float stamp is no round: validate_reply then rejects it
    reply, problem = read_reply(Message(content, reply_to=msg), Expected(7, tuple(state), ("l2-block-1", "l2-block-2")))
    assert reply is None and problem == "malformed reply: metrics l2-block-1 missing"
