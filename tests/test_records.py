"""Model state <-> Flower records (noprop.records): the packed layout, one Flower Array per message.

Round trips of every dtype and shape (0-d int64 buffers too), through Flower's own object deflation and
inflation as on the wire; the number of Flower objects a message costs, counted the way Flower counts them (its
message object tree); malformed packs rejected with a reason, by the records layer and by both strategies'
reply checks.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from test_client_app import task_identity  # noqa: F401 - autouse fixture: Flower's task identity for Messages

from noprop.federation import FederationConfig
from noprop.methods import build_model
from noprop.records import (
    PACKED_KEY,
    PACKED_STYPE,
    PackError,
    arrays_to_record,
    record_to_arrays,
    state_digest,
    to_numpy_state,
)
from noprop.server.aggregate import keys_for_blocks

RNG = np.random.default_rng(0)

STATE = {
    "f32": RNG.normal(size=(3, 4)).astype(np.float32),
    "f64": RNG.normal(size=(2, 2, 2)),
    "f16": RNG.normal(size=(5,)).astype(np.float16),
    "num_batches_tracked": np.asarray(np.int64(12345678901)),  # BatchNorm's 0-d int64 buffer
    "i32_0d": np.asarray(np.int32(-7)),
    "u8": np.arange(17, dtype=np.uint8),
    "i8": np.array([-128, 0, 127], dtype=np.int8),
    "bool": np.array([[True, False], [False, True]]),
    "c64": (RNG.normal(size=3) + 1j * RNG.normal(size=3)).astype(np.complex64),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "empty_i64": np.zeros((2, 0), dtype=np.int64),
    "transposed": np.asfortranarray(RNG.normal(size=(3, 5)).astype(np.float32)),  # not C-contiguous
    "big_endian": np.arange(4, dtype=">f4"),
}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)


def over_the_wire(msg: Message) -> Message:
    """What the receiving side gets: every object deflated to bytes, then inflated from them (Flower's own code)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    return inflate_object_from_contents(msg.object_id, contents)


def message(record: ArrayRecord) -> Message:
    return Message(RecordDict({"arrays": record, "config": ConfigRecord({"round": 1})}), dst_node_id=5,
                   message_type=MessageType.TRAIN)


def test_round_trip_every_dtype_and_shape():
    record = arrays_to_record(STATE)
    assert list(record) == [PACKED_KEY] and record[PACKED_KEY].stype == PACKED_STYPE
    got = record_to_arrays(record)
    assert_same(got, STATE)
    assert state_digest(got) == state_digest(STATE)
    assert all(v.flags.writeable and v.flags.owndata for v in got.values())  # each its own copy
    got["f32"][0, 0] = 99.0  # and a change to one leaves the record as it was
    assert record_to_arrays(record)["f32"][0, 0] == STATE["f32"][0, 0]


def test_round_trip_through_flowers_deflate_and_inflate():
    received = over_the_wire(message(arrays_to_record(STATE)))
    assert_same(record_to_arrays(received.content["arrays"]), STATE)


def test_keys_pick_and_order_the_tensors():
    keys = ["u8", "num_batches_tracked", "f32"]
    assert_same(record_to_arrays(arrays_to_record(STATE, keys)), {k: STATE[k] for k in keys})
    assert record_to_arrays(arrays_to_record({})) == {}


def test_unpacked_records_still_read_both_ways():
    """Flower's own layout (one Array per tensor: ArrayRecord(state_dict), its aggregation results) reads the same."""
    flat = arrays_to_record(STATE, packed=False)
    assert set(flat) == set(STATE) and all(a.stype == "numpy.ndarray" for a in flat.values())
    assert_same(record_to_arrays(flat), STATE)
    import torch
    flower = ArrayRecord({"w": torch.ones(2, 3), "n": torch.tensor(5)})
    got = record_to_arrays(flower)
    assert got["w"].shape == (2, 3) and got["n"].shape == () and got["n"].dtype == np.int64


def test_count_bytes_measures_the_tensors():
    payload = sum(v.nbytes for v in STATE.values())
    packed = arrays_to_record(STATE).count_bytes()
    flat = arrays_to_record(STATE, packed=False).count_bytes()
    assert payload < packed < payload + 1024  # the manifest: names, dtypes, shapes
    assert packed < flat  # numpy's per-array headers cost more than one manifest


def test_a_noprop_message_is_a_few_flower_objects():
    """A node owning 3 of the default T=10 blocks is sent ~100 tensors: one Flower object (RPC, hash, database
    write) each before, now one Array and its 5 MB chunks, whatever the number of tensors."""
    cfg = FederationConfig()
    state = to_numpy_state(build_model("dt", cfg.model_config((1, 8, 8), 10)).state_dict())
    keys = keys_for_blocks(state, [0, 1, 2])
    assert len(keys) > 100
    packed, flat = message(arrays_to_record(state, keys)), message(arrays_to_record(state, keys, packed=False))
    n_packed, n_flat = len(get_all_nested_objects(packed)), len(get_all_nested_objects(flat))
    payload = sum(state[k].nbytes for k in keys)
    chunks = -(-payload // (5 * 2**20))  # Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    # Message, RecordDict, ArrayRecord, ConfigRecord, the Array and its chunks
    assert n_packed == 5 + chunks, n_packed
    # an Array and a chunk per distinct tensor (Flower shares equal objects: a fresh model's zero biases, unit
    # BatchNorm weights); a trained model's tensors all differ, ~2 objects each
    assert n_flat > 90, n_flat
    assert_same(record_to_arrays(over_the_wire(packed).content["arrays"]), {k: state[k] for k in keys})


# ---- malformed packs: a reply is untrusted input ------------------------------------------------------------

def packed_bytes(state=None) -> bytes:
    return arrays_to_record(STATE if state is None else state)[PACKED_KEY].data


def with_manifest(manifest, payload: bytes = b"") -> bytes:
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return struct.pack("<4sI", b"NPK1", len(text)) + text + payload


def record_of(data: bytes, stype: str = PACKED_STYPE) -> ArrayRecord:
    record = ArrayRecord()
    record[PACKED_KEY] = Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)
    return record


GOOD = packed_bytes()
MALFORMED = {
    "truncated": (GOOD[:-1], "describes"),
    "extra bytes": (GOOD + b"\0", "describes"),
    "shorter than the header": (GOOD[:5], "header"),
    "bad magic": (b"XXXX" + GOOD[4:], "starts with"),
    "manifest longer than the data": (struct.pack("<4sI", b"NPK1", 10**6) + b"[]", "manifest length"),
    "manifest not JSON": (with_manifest(b"[[\"a\", "), "not JSON"),
    "manifest not UTF-8": (with_manifest(b"\xff\xfe"), "not JSON"),
    "manifest not a list": (with_manifest({"a": 1}), "not a list"),
    "entry not a triple": (with_manifest([["a", "<f4"]]), "entry 0"),
    "object dtype": (with_manifest([["a", "|O", [1]]], b"\0" * 8), "plain number"),
    "structured dtype": (with_manifest([["a", [["x", "<f4"]], [1]]], b"\0" * 4), "entry 0"),
    "void dtype": (with_manifest([["a", "|V4", [1]]], b"\0" * 4), "plain number"),
    "unknown dtype": (with_manifest([["a", "float99", [1]]], b"\0" * 4), "not a numpy dtype"),
    "negative size": (with_manifest([["a", "<f4", [-1]]]), "shape"),
    "size not an integer": (with_manifest([["a", "<f4", [1.5]]], b"\0" * 4), "shape"),
    "huge shape": (with_manifest([["a", "<f4", [2**30, 2**30]]], b"\0" * 4), "describes"),
    "name twice": (with_manifest([["a", "<f4", [1]], ["a", "<f4", [1]]], b"\0" * 8), "twice"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packs_are_rejected_with_a_reason(case):
    data, reason = MALFORMED[case]
    with pytest.raises(PackError, match=reason):
        record_to_arrays(record_of(data))


def test_a_pack_with_another_stype_or_beside_other_arrays_is_rejected():
    with pytest.raises(PackError, match="serialisation type"):
        record_to_arrays(record_of(GOOD, stype="numpy.ndarray"))
    record = record_of(GOOD)
    record["f32"] = Array.from_numpy_ndarray(STATE["f32"])
    with pytest.raises(PackError, match="also holds unpacked"):
        record_to_arrays(record)


def test_objects_cannot_be_packed():
    with pytest.raises(TypeError, match="cannot be packed"):
        arrays_to_record({"a": np.array(["text"], dtype=object)})


def test_flowers_aggregation_refuses_a_packed_record():
    """Packed bytes must never be averaged: Flower's own conversion to NumPy refuses the stype."""
    with pytest.raises(TypeError):
        arrays_to_record(STATE).to_numpy_ndarrays()


def _sent(state: dict, node: int) -> Message:
    msg = Message(RecordDict({"arrays": arrays_to_record(state), "config": ConfigRecord({})}), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _reply(to: Message, node: int, record: ArrayRecord, metrics: dict) -> Message:
    out = Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=to)
    out.metadata.__dict__["_src_node_id"] = node
    return out


def test_fedavg_rejects_a_malformed_pack_and_averages_the_rest():
    """The FedAvg path: the reply checks see every tensor of a packed reply, a malformed pack is rejected by node
    id, and Flower's FedAvg averages the unpacked honest replies tensor by tensor (example-weighted)."""
    from noprop.server.fedavg import checked_strategy

    cfg = FederationConfig(method="cnn", channels="4,8,8", hidden=16)
    state = to_numpy_state(build_model("cnn", cfg.model_config((1, 8, 8), 4)).state_dict())
    strategy = checked_strategy(cfg, log=lambda line: None)
    sent = {node: _sent(state, node) for node in (11, 12, 13, 14)}
    strategy.begin_round(2, arrays_to_record(state), list(sent.values()))
    key = next(k for k, v in state.items() if v.dtype == np.float32 and v.size > 1)
    a, b = {**state, key: state[key] + np.float32(1)}, {**state, key: state[key] + np.float32(3)}
    bad_key = {**state, key: state[key][:1]}
    replies = [_reply(sent[11], 11, arrays_to_record(a), {"round": 2, "num-examples": 100}),
               _reply(sent[12], 12, arrays_to_record(b), {"round": 2, "num-examples": 300}),
               _reply(sent[13], 13, record_of(packed_bytes(state)[:-3]), {"round": 2, "num-examples": 100}),
               _reply(sent[14], 14, arrays_to_record(bad_key), {"round": 2, "num-examples": 100})]
    arrays, _ = strategy.aggregate_train(2, replies)
    rejected = strategy.round_record["rejected"]
    assert set(rejected) == {"13", "14"}, rejected
    assert "malformed reply (PackError" in rejected["13"] and key in rejected["14"]
    assert list(arrays) == [PACKED_KEY]  # what goes out again is packed
    got = record_to_arrays(arrays)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in state.items()}
    np.testing.assert_allclose(got[key], state[key] + np.float32(2.5), rtol=0, atol=1e-6)  # (1*100 + 3*300) / 400


def test_block_strategy_rejects_a_malformed_pack():
    from noprop.server.aggregate import Expected, read_reply

    state = {"head.weight": np.ones((2, 2), np.float32)}
    to, expected = _sent(state, 7), Expected(7, ("head.weight",))
    reply, problem = read_reply(_reply(to, 7, record_of(b"NPK1\xff\xff\xff\xff"), {"round": 1}), expected)
    assert reply is None and "PackError" in problem and "manifest length" in problem
    reply, problem = read_reply(_reply(to, 7, arrays_to_record(state), {"round": 1, "num-examples": 5}), expected)
    assert problem is None and list(reply.arrays) == ["head.weight"]


def test_the_one_reply_check_counts_a_node_once_and_names_the_silent_and_the_unreachable():
    """check_replies, which every strategy calls: a second reply from a node does not count again (the first is the
    one kept), an error the SuperLink makes for an unreachable node (sent from the SuperLink, not the node) is that
    node's failure, a node with no reply has failed too, and a stale round stamp is rejected by node."""
    from flwr.app import Error

    from noprop.server.aggregate import Expected, check_replies

    state = {"head.weight": np.ones((2, 2), np.float32)}
    sent = {node: _sent(state, node) for node in (1, 2, 3, 4)}
    expected = {m.metadata.message_id: Expected(node, ("head.weight",)) for node, m in sent.items()}
    first, second = ({"head.weight": np.full((2, 2), v, np.float32)} for v in (2.0, 9.0))
    unreachable = Message(Error(code=0, reason="node unavailable"), reply_to=sent[3])
    unreachable.metadata.__dict__["_src_node_id"] = 0  # the SuperLink's own node id
    log: list[str] = []
    checked = check_replies([_reply(sent[1], 1, arrays_to_record(first), {"round": 5, "num-examples": 10}),
                             _reply(sent[1], 1, arrays_to_record(second), {"round": 5, "num-examples": 10}),
                             _reply(sent[2], 2, arrays_to_record(first), {"round": 4, "num-examples": 10}),
                             unreachable], expected, state, expected_round=5, log=log.append)
    assert [reply.node_id for _, reply in checked.accepted] == [1]
    np.testing.assert_array_equal(checked.accepted[0][1].arrays["head.weight"], first["head.weight"])
    assert set(checked.rejected) == {2} and "round 4" in checked.rejected[2]
    assert sorted(checked.failed) == [3, 4] and set(checked.bytes_from) == {1}
    assert any(line.startswith("node 3: training failed: node unavailable") for line in log), log
    assert any(line.startswith("node 1: reply ignored") for line in log), log
