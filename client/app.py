"""The noprop-fl ClientApp: answer discovery, train the blocks it is given, evaluate the assembled chain.

Each message runs in one of two places:
- relayed to the node's warm worker (client/worker.py) when the node config names one (`worker-dir`, set by
  noprop-client): this process then imports no torch and only carries the message over a Unix socket and back;
- here, in-process (simulation, where Ray's actors are already long-lived, and a SuperNode started by hand).
Either way the handlers are client/handlers.py, and a train reply's metrics carry the message's time parts.
"""

from __future__ import annotations

import os
import sys
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from noprop.client import worker

IMPORTED_AT = time.time()  # Flower loads the ClientApp after it pulled the message and installed the app


def process_start() -> float | None:
    """Wall clock of this process's start, when it is Flower's per-message flwr-clientapp (else None)."""
    if os.path.basename(sys.argv[0]) != "flwr-clientapp":
        return None
    try:  # Linux: the start in clock ticks since boot, against the boot clock now (10 ms)
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, AttributeError):  # psutil's is whole seconds off: it counts from btime
        import psutil

        return psutil.Process().create_time()


def handle_here(kind: str, content: RecordDict, context: Context, run_config: dict) -> RecordDict:
    """Run the handler in this process (the cold path: the first message here pays for torch and the data)."""
    start = time.perf_counter()
    from noprop.client import handlers  # torch and the method: what a cold start pays for, once per process

    imports_s = time.perf_counter() - start
    reply = handlers.handle(kind, content, run_config, dict(context.node_config), context.state, context.node_id)
    if kind == "train":
        reply["metrics"]["time-imports-s"] = imports_s
    return reply


def handle_in_worker(kind: str, content: RecordDict, context: Context, run_config: dict) -> RecordDict:
    """Relay the message to the node's warm worker (started here if none answers) and return its reply."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    node_config = dict(context.node_config)
    folder = str(node_config["worker-dir"])
    owner = int(node_config.get("worker-owner", os.getppid()))
    start = time.perf_counter()
    waited = worker.ensure_worker(folder, node_config, owner, run_config)
    body = recorddict_to_proto(content).SerializeToString()
    header = {"kind": kind, "run_config": run_config, "node_config": node_config, "node_id": context.node_id}
    reply, data = worker.request(folder, header, body)
    if not reply.get("ok"):
        raise worker.WorkerError(f"the node's worker refused the {kind} message: {reply.get('error')}")
    result = recorddict_from_proto(ProtoRecordDict.FromString(data))
    if kind == "train":
        relay_s = time.perf_counter() - start - waited - float(reply.get("handler_s", 0.0))
        result["metrics"]["time-worker-start-s"] = waited
        result["metrics"]["time-relay-s"] = max(0.0, relay_s)
        result["metrics"]["time-imports-s"] = 0.0
    return result


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; overrides stand in for run config where Flower passes none (simulation)."""
    app = ClientApp()

    def dispatch(kind: str, msg: Message, context: Context) -> Message:
        entered = time.time()
        run_config = {**dict(context.run_config), **(overrides or {})}
        handle = handle_in_worker if context.node_config.get("worker-dir") else handle_here
        content = handle(kind, msg.content, context, run_config)
        if kind == "train":  # wall clocks, for the server's timeline of the round (same machine: comparable)
            metrics = content["metrics"]
            metrics["clock-handler-start"], metrics["clock-handler-end"] = entered, time.time()
            started = process_start()
            if started is not None:  # this process: Flower's start, the message pull, the app's install and import
                import psutil

                metrics["clock-process-start"] = started
                metrics["clock-app-import"] = IMPORTED_AT
                metrics["time-to-handler-s"] = max(0.0, entered - started)
                metrics["cpu-process-s"] = sum(psutil.Process().cpu_times()[:2])
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return dispatch("query", msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return dispatch("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return dispatch("evaluate", msg, context)

    return app


app = make_client_app()
