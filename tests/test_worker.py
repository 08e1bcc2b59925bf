"""The node's warm worker (client/worker.py) and the ClientApp's relay to it, with a real worker process: the
relayed reply equals the in-process one bit for bit, the relay imports no torch, the channel is the node's own,
a malformed frame is refused without stopping the worker, and a worker that dies mid-message fails that message
at once while the next message starts a fresh one."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType, RecordDict
from procs import wait_for
from test_client_app import MODEL, context, instruction, npz, task_identity, train_message  # noqa: F401 - fixtures

from noprop.client import worker
from noprop.client.app import make_client_app
from noprop.model import NoPropDT
from noprop.records import record_to_arrays, to_numpy_state

pytestmark = pytest.mark.e2e  # a real worker process behind the ClientApp's relay


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "node" / "noprop-workers" / "9999"
    yield path
    worker.stop_worker(path)
    wait_for(lambda: not worker._is_worker(worker.read_pid(path)), 30, what="the worker to stop")


def relayed_context(data, folder, **extra):
    ctx = context(data)
    ctx.node_config.update({"worker-dir": str(folder), "worker-owner": os.getpid(), **extra})
    return ctx


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def initial_state():
    torch.manual_seed(0)
    return to_numpy_state(NoPropDT(MODEL).state_dict())


def test_relayed_train_equals_in_process_train_bit_for_bit(npz, folder):  # noqa: F811
    state = initial_state()
    app = make_client_app()
    here = app(train_message(state, (2, 4)), context(npz))
    relayed = app(train_message(state, (2, 4)), relayed_context(npz, folder))
    assert worker._is_worker(worker.read_pid(folder)), "the relay started a worker"
    a, b = record_to_arrays(here.content["arrays"]), record_to_arrays(relayed.content["arrays"])
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]
    assert not np.array_equal(b["blocks.2.fuse.6.weight"], state["blocks.2.fuse.6.weight"])
    m = relayed.content["metrics"]
    assert m["l2-block-2"] == here.content["metrics"]["l2-block-2"]
    assert m["time-worker-start-s"] > 0 and m["time-imports-s"] == 0.0  # this message waited for the worker
    # the second message finds it warm: no start, the data already partitioned
    pid = worker.read_pid(folder)
    again = app(train_message(state, (1,)), relayed_context(npz, folder)).content["metrics"]
    assert worker.read_pid(folder) == pid and again["time-worker-start-s"] == 0.0
    assert again["time-data-s"] < 0.05, again


def test_the_channel_is_only_the_nodes(npz, folder):  # noqa: F811
    worker.ensure_worker(folder, relayed_context(npz, folder).node_config, os.getpid())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    sock = worker.socket_path(folder)
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    pid = worker.read_pid(folder)
    tables = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    listening = [line for line in tables if line.split()[3] == "0A"]
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert not [line for line in listening if f"socket:[{line.split()[9]}]" in inodes], "the worker has a TCP port"


def test_relay_imports_no_torch(npz, folder, tmp_path):  # noqa: F811
    state = initial_state()
    msg_path = tmp_path / "msg.bin"
    from flwr.common.serde import recorddict_to_proto

    msg_path.write_bytes(recorddict_to_proto(train_message(state, (3,)).content).SerializeToString())
    node_config = relayed_context(npz, folder).node_config
    code = f"""
import json, sys
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as P
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
from noprop.client.app import make_client_app
content = recorddict_from_proto(P.FromString(open({str(msg_path)!r}, "rb").read()))
msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
msg.metadata.__dict__["_message_id"] = msg.object_id
ctx = Context(run_id=1, node_id=5, node_config=json.loads({json.dumps(json.dumps(node_config))}), state=RecordDict(),
              run_config={{}})
reply = make_client_app()(msg, ctx)
from noprop.records import record_to_arrays
print(json.dumps({{"torch": "torch" in sys.modules, "keys": sorted(record_to_arrays(reply.content["arrays"]))}}))
"""
    # output to a file: the worker it starts inherits stdout and outlives it, so a pipe would never see EOF
    log = tmp_path / "relay.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{\"torch\"")))
    assert result["torch"] is False, "the relay imported torch"
    assert result["keys"] and all(k.startswith(("blocks.3.", "head.", "embedding.")) for k in result["keys"])


def raw_exchange(folder, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, worker._bindable(worker.socket_path(folder)) as a:
        s.connect(a)
        s.sendall(payload)
        return worker.recv_frame(s)[0]


def test_malformed_frames_are_refused_and_the_worker_goes_on(npz, folder):  # noqa: F811
    ctx = relayed_context(npz, folder)
    worker.ensure_worker(folder, ctx.node_config, os.getpid())
    pid = worker.read_pid(folder)
    assert "malformed frame" in raw_exchange(folder, b"GET / HTTP/1.1\r\n\r\n")["error"]
    huge = worker.FRAME.pack(worker.MAGIC, 10, worker.MAX_BODY + 1)
    assert "too large" in raw_exchange(folder, huge)["error"]
    not_json = worker.FRAME.pack(worker.MAGIC, 3, 0) + b"{{{"
    assert "malformed frame" in raw_exchange(folder, not_json)["error"]
    reply, _ = worker.request(folder, {"kind": "fly"})
    assert not reply["ok"] and "unknown message kind" in reply["error"]
    header = {"kind": "train", "run_config": {}, "node_config": dict(ctx.node_config), "node_id": 5}
    reply, _ = worker.request(folder, header, b"\xff\x00 not a protobuf")
    assert not reply["ok"] and "DecodeError" in reply["error"], reply
    reply, _ = worker.request(folder, {"kind": "train", "run_config": {}, "node_config": dict(ctx.node_config)})
    assert not reply["ok"], reply  # an empty content has no config: the handler's KeyError comes back
    # a client that connects and hangs up mid-frame does not stop it either
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, worker._bindable(worker.socket_path(folder)) as a:
        s.connect(a)
        s.sendall(worker.MAGIC)
    assert worker.request(folder, {"kind": "ping"})[0] == {"ok": True, "pid": pid}
    # and a train message still works after all of that, on the same worker
    reply = make_client_app()(train_message(initial_state(), (1,)), ctx)
    assert set(record_to_arrays(reply.content["arrays"])) and worker.read_pid(folder) == pid


def test_worker_killed_mid_message_fails_it_at_once_and_the_next_message_starts_a_fresh_one(npz, folder):  # noqa: F811
    ctx = relayed_context(npz, folder)
    worker.ensure_worker(folder, ctx.node_config, os.getpid())
    first = worker.read_pid(folder)
    app = make_client_app()
    outcome: dict = {}

    def long_train():
        try:
            outcome["reply"] = app(train_message(initial_state(), (1, 2, 3, 4), epochs=200), ctx)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    base = cpu_seconds(first)
    thread = threading.Thread(target=long_train)
    thread.start()
    # well into training (200 epochs of four blocks take minutes): the worker has spent 2 s of CPU on the message
    wait_for(lambda: cpu_seconds(first) - base > 2.0 or not thread.is_alive(), 300, interval=0.1,
             what="the worker to start training the message")
    assert thread.is_alive(), outcome
    os.kill(first, signal.SIGKILL)
    # at once: 200 epochs take minutes, and a relay that waited for the reply would still be waiting here (no
    # bound on the seconds it took: load stretches them)
    thread.join(120)
    assert not thread.is_alive(), "the relay hung on a dead worker"
    assert isinstance(outcome.get("error"), worker.WorkerError), outcome
    assert "closed the connection before replying" in str(outcome["error"])
    reply = app(train_message(initial_state(), (2,)), ctx)  # a fresh worker answers the next message
    assert worker.read_pid(folder) != first and worker._is_worker(worker.read_pid(folder))
    assert reply.content["metrics"]["time-worker-start-s"] > 0
    assert set(record_to_arrays(reply.content["arrays"])) >= {"blocks.2.fuse.6.weight"}


def test_worker_stops_when_its_owner_is_gone(npz, folder):  # noqa: F811
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        worker.ensure_worker(folder, relayed_context(npz, folder).node_config, owner.pid)
        pid = worker.read_pid(folder)
        assert worker._is_worker(pid)
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not worker._is_worker(pid), 30, interval=0.2, what="the worker to notice its owner is gone")


def test_query_and_evaluate_are_relayed_too(npz, folder):  # noqa: F811
    from flwr.app import ConfigRecord

    app = make_client_app()
    ctx = relayed_context(npz, folder)
    config = ConfigRecord({"model-config": json.dumps(MODEL.to_dict()), "batch-size": 32})
    cap = app(instruction(RecordDict({"config": config}), MessageType.QUERY), ctx).content["capacity"]
    here = app(instruction(RecordDict({"config": config}), MessageType.QUERY), context(npz)).content["capacity"]
    assert worker._is_worker(worker.read_pid(folder)), "the relay started a worker"
    # what the worker answers is what the ClientApp answers in process (the measured throughput and the free
    # memory aside); 300 = partition 0 of 2 of the 600 examples
    same = ("num-examples", "device", "data")
    assert {k: cap[k] for k in same} == {k: here[k] for k in same} and cap["num-examples"] == 300, (cap, here)
    assert cap["throughput"] > 0 and cap["max-blocks"] >= 1
    from noprop.records import arrays_to_record

    content = RecordDict({"arrays": arrays_to_record(initial_state()),
                          "config": ConfigRecord({"method": "dt", "model-config": json.dumps(MODEL.to_dict()),
                                                  "eval-mode": "deterministic"})})
    m = app(instruction(content, MessageType.EVALUATE), ctx).content["metrics"]
    in_process = app(instruction(content, MessageType.EVALUATE), context(npz)).content["metrics"]
    assert m["num-examples"] == in_process["num-examples"] == 100
    assert m["accuracy"] == in_process["accuracy"], (dict(m), dict(in_process))  # deterministic: bit for bit
    assert 0.0 <= m["accuracy"] <= 1.0
