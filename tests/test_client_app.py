"""The ClientApp's handlers called directly with constructed Messages (no Flower processes)."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from synthetic import synthetic_arrays

from noprop.client.app import make_client_app
from noprop.client.capacity import max_blocks_for_memory
from noprop.device import resolve_device
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state
from noprop.server.aggregate import block_of_key, keys_for_blocks

MODEL = NoPropConfig(input_shape=(1, 12, 12), num_classes=4, T=4, channels=(8, 16, 16), hidden=32, dropout=0.0)
LEARNED = NoPropConfig(**{**MODEL.to_dict(), "embedding": "learned:8"})  # W is trained too


@pytest.fixture
def npz(tmp_path):
    x, y = synthetic_arrays(600, seed=1)
    xt, yt = synthetic_arrays(200, seed=2)
    path = tmp_path / "task.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def context(npz, partition_id=0, num_partitions=2):
    node_config = {"data": f"npz:{npz}", "partition-id": partition_id, "num-partitions": num_partitions,
                   "threads": 1}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(autouse=True)
def task_identity():
    """What Flower's runtime sets in a process before it runs app code."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def instruction(content, message_type):
    msg = Message(content, dst_node_id=5, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # the SuperLink sets this on delivery
    return msg


def train_message(state, blocks, epochs=1, model_cfg: NoPropConfig = MODEL):
    keys = keys_for_blocks(state, blocks)
    config = ConfigRecord({"method": "dt", "round": 1, "blocks": list(blocks), "local-epochs": epochs, "lr": 3e-3,
                           "weight-decay": 1e-3, "batch-size": 32, "seed": 0,
                           "model-config": json.dumps(model_cfg.to_dict())})
    return instruction(RecordDict({"arrays": arrays_to_record(state, keys), "config": config}), MessageType.TRAIN)


def test_query_reports_capacity(npz):
    app = make_client_app()
    config = ConfigRecord({"model-config": json.dumps(MODEL.to_dict()), "batch-size": 32})
    reply = app(instruction(RecordDict({"config": config}), MessageType.QUERY), context(npz))
    cap = reply.content["capacity"]
    # the node config names no device, so the node reports what "auto" picks here (cuda on a GPU runner)
    assert cap["device"] == resolve_device("auto").type and cap["num-examples"] == 300  # half of 600 (partition 0 of 2)
    assert math.isfinite(cap["throughput"]) and cap["throughput"] > 0 and cap["memory-mb"] > 0
    # as many blocks as the memory it reports holds (the model and a batch per block, the data once) ...
    data_mb = 300 * 12 * 12 * 4 / 2**20  # partition 0 of 2: 300 float32 images of 1x12x12
    assert cap["max-blocks"] == max_blocks_for_memory(MODEL, 32, cap["memory-mb"], data_mb) >= 1, dict(cap)
    # ... and no more than the node's own --max-blocks
    capped = context(npz)
    capped.node_config["max-blocks"] = 1
    assert app(instruction(RecordDict({"config": config}), MessageType.QUERY), capped).content["capacity"][
        "max-blocks"] == 1


def test_train_replies_with_exactly_the_owned_blocks_and_losses_fall(npz):
    """The reply is the owned blocks plus the shared tensors, nothing else, and everything in it that trains did.

    Every floating tensor of an owned block changes: its weights and biases by AdamW, BatchNorm's running_mean and
    running_var by the forward passes. BatchNorm's num_batches_tracked is an integer step count, checked apart.
    With a learned embedding (learned:8) W is trained beside the head, so both change too.
    """
    app = make_client_app()
    torch.manual_seed(0)
    state = to_numpy_state(NoPropDT(LEARNED).state_dict())
    ctx = context(npz)
    owned = (2, 4)
    reply = app(train_message(state, owned, model_cfg=LEARNED), ctx)
    got = record_to_arrays(reply.content["arrays"])
    expected_keys = keys_for_blocks(state, owned)
    assert sorted(got) == sorted(expected_keys)
    assert {block_of_key(k) for k in got} == {None, *owned}  # no block the node does not own
    assert {k for k in expected_keys if not k.startswith("blocks.")} == {"embedding.weight", "head.linear.weight",
                                                                         "head.linear.bias"}
    assert all(got[k].shape == state[k].shape and got[k].dtype == state[k].dtype for k in got)
    floating = [k for k in got if got[k].dtype.kind == "f"]
    assert {k for k in got if k not in floating} == {k for k in got if k.endswith("num_batches_tracked")}
    unchanged = [k for k in floating if np.array_equal(got[k], state[k])]
    assert not unchanged, f"the node sent these back untrained: {unchanged}"
    for t in owned:
        assert {k for k in floating if k.startswith(f"blocks.{t}.")}, f"block {t} is missing from the reply"
    steps = {int(got[k]) - int(state[k]) for k in got if k.endswith("num_batches_tracked")}
    assert steps == {math.ceil(300 / 32)}, steps  # one epoch of 300 examples in batches of 32, through every BN
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 300
    first = metrics["l2-block-2"]
    state.update(got)
    for _ in range(3):
        reply = app(train_message(state, owned, model_cfg=LEARNED), ctx)
        state.update(record_to_arrays(reply.content["arrays"]))
    assert reply.content["metrics"]["l2-block-2"] < first


def test_train_on_data_of_the_wrong_shape_fails_with_a_clear_message(tmp_path):
    x, y = synthetic_arrays(100, size=16)
    path = tmp_path / "other.npz"
    np.savez(path, x=x, y=y)
    app = make_client_app()
    state = to_numpy_state(NoPropDT(MODEL).state_dict())
    # Flower's runtime turns the exception into an error reply carrying this message
    with pytest.raises(ValueError, match=r"has input \(1, 16, 16\).*expects \(1, 12, 12\)"):
        app(train_message(state, (1,)), context(path, 0, 1))


def test_the_clientapp_process_start_is_read_to_the_clock_tick():
    """The timeline's first part (push -> the ClientApp process's start) needs the start to 10 ms: psutil's
    create_time counts from the boot time in whole seconds, up to a second early, which made parts negative.
    A process started here must report a start between the two clock readings around its spawn."""
    import subprocess
    import sys
    import time

    code = ("import sys; sys.argv = ['/venv/bin/flwr-clientapp']; from noprop.client.app import process_start; "
            "print(repr(process_start()))")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    after = time.time()
    started = float(out.strip().splitlines()[-1])
    assert before - 0.02 <= started <= after, (before, started, after)
