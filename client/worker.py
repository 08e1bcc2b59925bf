"""A node's warm worker: one long-lived process that keeps torch, the node's data and its partition loaded, and
answers the messages Flower's per-message ClientApp relays to it over a Unix socket.

Flower 1.39 starts a fresh `flwr-clientapp` process for every message (upstream: "non-ephemeral ClientApp",
flwrlabs/flower#3670). Importing torch, loading and partitioning the data and building the model again for every
message cost seconds each round; here they are paid once per node. This module imports no torch: the relay side
(client/app.py in the `flwr-clientapp` process) uses only the socket protocol and `ensure_worker`; the serving
side imports the handlers (client/handlers.py) when it starts.

The channel is only this node's: the socket sits in a 0700 folder of the node's state dir and is itself 0600,
never a TCP port. One frame each way per message: magic, header and body lengths, a JSON header (kind, run and
node config) and the message content as Flower's own protobuf (flwr.common.serde). A malformed frame gets an
error reply and the worker goes on; a worker that dies mid-message closes the socket, so the relay fails the
message at once (Flower sends the server an error reply) and the next message starts a fresh worker.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

MAGIC = b"NPW1"
FRAME = struct.Struct(">4sIQ")  # magic, header length, body length
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 34  # 16 GiB: far above any model this runs, small enough to refuse a garbage length
START_TIMEOUT_S = 600.0  # torch import and data load on a slow, loaded device
KINDS = ("ping", "query", "train", "evaluate")


class WorkerError(RuntimeError):
    """The worker could not be reached, refused a frame, or died mid-message."""


# -- where a node's worker lives ---------------------------------------------------------------------------------
def worker_dir(state_dir: str | os.PathLike, port: int) -> Path:
    """The folder of the worker of the SuperNode on local port `port` (unique on this machine while it runs)."""
    return Path(state_dir) / "noprop-workers" / str(port)


def socket_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / "worker.sock"


@contextlib.contextmanager
def _bindable(path: Path) -> Iterator[str]:
    """An AF_UNIX address for path: Linux caps it at 108 bytes, so a long one goes through /proc/self/fd/N."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- frames ------------------------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, header: Mapping, body: bytes = b"") -> None:
    head = json.dumps(dict(header)).encode()
    sock.sendall(FRAME.pack(MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    """One frame; ValueError for a frame that is not ours, EOFError if the other side went away."""
    magic, head_len, body_len = FRAME.unpack(_recv_exact(sock, FRAME.size))
    if magic != MAGIC:
        raise ValueError(f"not a noprop worker frame (magic {magic!r})")
    if head_len > MAX_HEADER or body_len > MAX_BODY:
        raise ValueError(f"frame too large (header {head_len} B, body {body_len} B)")
    header = json.loads(_recv_exact(sock, head_len))
    if not isinstance(header, dict):
        raise ValueError("frame header is not a JSON object")
    return header, _recv_exact(sock, body_len)


# -- the relay's side --------------------------------------------------------------------------------------------
def request(folder: str | os.PathLike, header: Mapping, body: bytes = b"") -> tuple[dict, bytes]:
    """Send one message to the worker and wait for its reply (as long as it lives: training takes what it takes).
    Raises WorkerError if it cannot be reached or closes the connection before replying."""
    path = socket_path(folder)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _bindable(path) as address:
            sock.connect(address)
    except OSError as exc:
        sock.close()
        raise WorkerError(f"no worker answers at {path}: {exc}") from None
    with sock:
        try:
            send_frame(sock, header, body)
            reply, reply_body = recv_frame(sock)
        except (OSError, EOFError, ValueError) as exc:
            pid = read_pid(folder)
            raise WorkerError(f"the node's worker (pid {pid}) closed the connection before replying ({exc}); it "
                              "probably died (see the node's log); the next message starts a fresh one") from None
    return reply, reply_body


def read_pid(folder: str | os.PathLike) -> int | None:
    try:
        return int((Path(folder) / "worker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def alive(folder: str | os.PathLike) -> bool:
    try:
        reply, _ = request(folder, {"kind": "ping"})
    except WorkerError:
        return False
    return bool(reply.get("ok"))


def start_worker(folder: str | os.PathLike, node_config: Mapping, owner_pid: int, run_config: Mapping | None = None,
                 env: Mapping | None = None) -> subprocess.Popen:
    """Start a worker in a session of its own (it outlives the ClientApp process that started it, and ends when
    its owner, the noprop-client launcher, is gone). It writes to the starter's stdout and stderr, the node's log.
    Returns at once; it answers once torch and its data are loaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    cmd = [sys.executable, "-m", "noprop.client.worker", "--dir", str(folder), "--owner-pid", str(owner_pid),
           "--node-config", json.dumps(dict(node_config)), "--run-config", json.dumps(dict(run_config or {}))]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(env) if env is not None else None)
    (folder / "worker.pid").write_text(f"{proc.pid}\n")  # now, so that a relay arriving first waits for this one
    return proc


def ensure_worker(folder: str | os.PathLike, node_config: Mapping, owner_pid: int, run_config: Mapping | None = None,
                  timeout: float = START_TIMEOUT_S) -> float:
    """Make sure a worker answers in folder, starting one if none does; returns the seconds spent waiting (0 when
    it was already up). Raises WorkerError if a fresh worker exits or does not answer in time."""
    if alive(folder):
        return 0.0
    start = time.monotonic()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others find it up
        if alive(folder):
            return time.monotonic() - start
        pid = read_pid(folder)
        proc = None if _is_worker(pid) else start_worker(folder, node_config, owner_pid, run_config)
        while time.monotonic() - start < timeout:
            if alive(folder):
                return time.monotonic() - start
            if proc is not None and proc.poll() is not None:
                raise WorkerError(f"the node's worker exited with code {proc.returncode} while starting (see the "
                                  "node's log)")
            if proc is None and not _is_worker(pid):  # the one we waited for (started by someone else) is gone
                proc = start_worker(folder, node_config, owner_pid, run_config)
            time.sleep(0.05)
    raise WorkerError(f"the node's worker did not answer within {timeout:.0f}s (see the node's log)")


def _running(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped), or a reused pid, is no worker
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _is_worker(pid: int | None) -> bool:
    if not _running(pid):
        return False
    try:
        return b"noprop.client.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the pid


def stop_worker(folder: str | os.PathLike) -> None:
    """SIGTERM the worker of folder, if one runs (the launcher does this when the node stops)."""
    import signal

    pid = read_pid(folder)
    if _is_worker(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


# -- the worker's side -------------------------------------------------------------------------------------------
class Worker:
    """Serves one connection at a time (a SuperNode runs one message at a time), for as long as its owner lives."""

    def __init__(self, folder: Path, owner_pid: int, node_config: dict):
        start = time.perf_counter()
        from flwr.app import RecordDict

        from noprop.client import handlers

        self.import_s = time.perf_counter() - start  # torch and the method, once for the node's life

        self.folder, self.owner_pid, self.node_config = folder, owner_pid, node_config
        self.handlers = handlers
        self.state = RecordDict()  # node-level state kept between messages (the measured throughput)

    def handle(self, header: dict, body: bytes) -> tuple[dict, bytes]:
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        kind = header.get("kind")
        if kind not in KINDS:
            return {"ok": False, "error": f"unknown message kind {kind!r} (expected one of {', '.join(KINDS)})"}, b""
        if kind == "ping":
            return {"ok": True, "pid": os.getpid()}, b""
        run_config, node_config = header.get("run_config"), header.get("node_config")
        if not isinstance(run_config, dict) or not isinstance(node_config, dict):
            return {"ok": False, "error": "frame header lacks run_config or node_config"}, b""
        content = recorddict_from_proto(ProtoRecordDict.FromString(body))
        start = time.perf_counter()
        reply = self.handlers.handle(kind, content, run_config, node_config, self.state, int(header.get("node_id", 0)))
        handler_s = time.perf_counter() - start
        data = recorddict_to_proto(reply).SerializeToString()
        return {"ok": True, "handler_s": handler_s}, data

    def serve_connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                header, body = recv_frame(conn)
            except (EOFError, OSError):
                return  # the relay went away (a ping's probe, or its process ended): nothing to answer
            except Exception as exc:  # noqa: BLE001 - a malformed frame is refused, the worker goes on
                with contextlib.suppress(OSError):
                    send_frame(conn, {"ok": False, "error": f"malformed frame: {type(exc).__name__}: {exc}"})
                return
            try:
                reply, data = self.handle(header, body)
            except Exception as exc:  # noqa: BLE001 - the handler's error goes back to the relay as its error
                traceback.print_exc()
                reply, data = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b""
            with contextlib.suppress(OSError):  # the relay may be gone (its ClientApp was stopped)
                send_frame(conn, reply, data)

    def watch_owner(self) -> None:
        while _running(self.owner_pid):
            time.sleep(1.0)
        print(f"owner process {self.owner_pid} is gone: the worker stops", flush=True)
        os._exit(0)

    def serve(self) -> None:
        path = socket_path(self.folder)
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: only this user can talk to the node's worker
        try:
            with _bindable(path) as address:
                server.bind(address)
        finally:
            os.umask(old)
        server.listen(8)
        threading.Thread(target=self.watch_owner, daemon=True).start()
        print(f"worker {os.getpid()} ready on {path}", flush=True)
        while True:
            conn, _ = server.accept()
            self.serve_connection(conn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noprop.client.worker",
                                description="A noprop-client node's warm worker (started by noprop-client and by "
                                            "the ClientApp; not meant to be run by hand).")
    p.add_argument("--dir", required=True)
    p.add_argument("--owner-pid", type=int, required=True)
    p.add_argument("--node-config", required=True, help="the node config, as JSON")
    p.add_argument("--run-config", default="{}", help="the run config, as JSON, if known (to preload the partition)")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    started = time.perf_counter()
    worker = Worker(folder, args.owner_pid, json.loads(args.node_config))
    node_config = worker.node_config
    with contextlib.suppress(Exception):  # a bad data spec fails the first message instead, with its own error
        worker.handlers.preload(json.loads(args.run_config), node_config)
    print(f"worker {os.getpid()}: torch and the handlers imported in {worker.import_s:.1f}s, data loaded in "
          f"{time.perf_counter() - started - worker.import_s:.1f}s", flush=True)
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
