"""Helpers for tests that start the launchers as real processes: a quiet loopback-only environment, process
trees found through /proc (the launchers put Flower's processes in sessions of their own), and a cleanup that
always ends the whole tree."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from synthetic import synthetic_arrays

BIN = Path(sys.executable).parent


def script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: reinstall the package (pip install -e .) to get the console scripts"
    return str(path)


def quiet_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_synthetic_npz(path: Path, n_train: int = 1200, n_test: int = 400) -> Path:
    x, y = synthetic_arrays(n_train, seed=1)
    xt, yt = synthetic_arrays(n_test, seed=2)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    children = _children_map()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (zombies, which only wait to be reaped, count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Spawned:
    """A launcher started by a test: own session, output in a file, the whole tree killed by ``cleanup``."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None):
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in cleanup
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def snapshot(self) -> set[int]:
        """Remember the current process tree (to check later that none of it outlives the launcher)."""
        self.seen |= descendants(self.pid)
        return self.seen

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_tree(self, sig: int = signal.SIGKILL) -> None:
        """Kill the launcher and everything under it at once, like a machine that dies."""
        pids = descendants(self.pid) | {self.pid}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def terminate(self) -> None:
        self.snapshot()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def cleanup(self, grace: float = 20.0) -> None:
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        pids = self.seen | descendants(self.pid) | {self.pid}
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._out.close()

    def leftovers(self) -> list[int]:
        return sorted(pid for pid in self.seen if alive(pid))


SIMULATION_LOCK = Path(tempfile.gettempdir()) / "noprop-tests-simulation.lock"
_simulation_slot = None  # the open lock file while this process holds the slot


def one_simulation_at_a_time(request) -> None:
    """Hold, until the test's end, the one slot for a noprop-sim on this machine: Flower's simulation engine
    starts a Ray cluster that takes every core it is given (--num-cpus), so two at once (pytest-xdist workers)
    would only slow each other down. Call it before spawning the simulation: finalizers run last-in first-out,
    so the slot is freed after the simulation's cleanup."""
    global _simulation_slot
    assert request.node.path.name == "test_sim.py", (
        f"{request.node.nodeid} runs noprop-sim: move it to tests/test_sim.py (make test runs that module in one "
        "worker, one Ray cluster at a time)")
    if _simulation_slot is not None:  # this test holds it already (a second simulation in one test)
        return
    lock = open(SIMULATION_LOCK, "a")  # noqa: SIM115 - held until the finalizer
    fcntl.flock(lock, fcntl.LOCK_EX)
    _simulation_slot = lock

    def release() -> None:
        global _simulation_slot
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        _simulation_slot = None

    request.addfinalizer(release)


def run_sim_to_end(args: list[str], tmp_path: Path, request, timeout: float, log_name: str = "sim.log") -> str:
    """Run noprop-sim with args in its own session (cleaned up with the test), wait for it to end, assert exit 0 and
    return its log."""
    one_simulation_at_a_time(request)
    sim = Spawned([script("noprop-sim"), *args], tmp_path / log_name, quiet_env(tmp_path / "flwr-home"), cwd=tmp_path)
    request.addfinalizer(sim.cleanup)
    deadline = time.monotonic() + timeout
    while sim.proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"noprop-sim did not finish within {timeout:.0f}s\n{sim.text()[-5000:]}")
        time.sleep(1.0)
    log = sim.text()
    assert sim.proc.returncode == 0, log[-5000:]
    return log


def wait_for(check: Callable[[], object], timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def cleanup_all(spawned: list[Spawned], grace: float = 20.0) -> None:
    """SIGTERM to every launcher at once (each stops its own Flower processes), then clean up each."""
    for p in spawned:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in spawned:
        p.cleanup(max(0.0, deadline - time.monotonic()))


class Relay:
    """A TCP relay on 127.0.0.1 in front of 127.0.0.1:``target_port`` that records every byte of every connection,
    each way (``streams("up")``: client to server); a test points a client at ``port`` to watch or cut its link."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[dict[str, bytearray]] = []
        self.lock = threading.Lock()
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            record = {"up": bytearray(), "down": bytearray()}
            with self.lock:
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, record), daemon=True).start()

    def _pump(self, client: socket.socket, record: dict[str, bytearray]) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        peers = {client: (server, "up"), server: (client, "down")}
        with client, server:
            while not self.closing:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    other, direction = peers[sock]
                    with self.lock:
                        record[direction] += data
                    try:
                        other.sendall(data)
                    except OSError:
                        return

    def streams(self, direction: str) -> list[bytes]:
        with self.lock:
            return [bytes(c[direction]) for c in self.connections if c[direction]]

    def close(self) -> None:
        self.closing = True
        self.listener.close()
