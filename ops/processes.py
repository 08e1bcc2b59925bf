"""Child processes: each in its own process group, dying with its launcher, always stopped; short checks in a
child of their own."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from noprop.ops.cli import LaunchError
from noprop.ops.flower import flower_env

# ----------------------------------------------------------------------------------------------------------
# Processes: own process group each, always stopped (leader first, then whatever is left in the group)

_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


def _child_setup() -> None:
    # runs in the child after fork: if the launcher dies (even by SIGKILL), the child gets SIGTERM
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_SETPRIV = shutil.which("setpriv")  # util-linux, essential on Debian


def dying_with_us(cmd: Sequence[str]) -> tuple[list[str], Callable[[], None] | None]:
    """(command, preexec_fn) for a child that gets SIGTERM when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG). With util-linux's setpriv the child sets it itself before it execs the command, so no
    Python runs between fork and exec (a preexec_fn can deadlock there when the parent has threads, as the
    launchers do); without setpriv, prctl in a preexec_fn."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd], None
    return list(cmd), _child_setup if _LIBC is not None else None


def _forward_lines(pipe, watch: Callable[[str], None]) -> None:
    """Copy a child's output to ours line by line, showing each line to watch."""
    for raw in iter(pipe.readline, b""):
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        watch(raw.decode(errors="replace"))
    pipe.close()


class ProcessGroup:
    """A child started in its own session (so Ctrl-C in the terminal reaches only the launcher), stopped as a
    group. All live ones are stopped at interpreter exit."""

    live: list[ProcessGroup] = []

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_path: Path | None = None,
                 cwd: str | os.PathLike | None = None, watch: Callable[[str], None] | None = None):
        """log_path: the child's output goes there; else to ours, and with watch, through a pipe whose every line
        is also handed to watch (on a reader thread)."""
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed in stop()
        out = self._log if self._log is not None else (subprocess.PIPE if watch is not None else None)
        argv, preexec = dying_with_us(self.cmd)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT if out is not None else None,
                                     start_new_session=True, preexec_fn=preexec)
        self.pid = self.proc.pid
        if out is subprocess.PIPE:
            threading.Thread(target=_forward_lines, args=(self.proc.stdout, watch), daemon=True).start()
        ProcessGroup.live.append(self)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a member we cannot signal
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the leader and up to ``grace`` s for it to exit (Flower's processes shut down cleanly on
        SIGTERM), then SIGTERM and SIGKILL to whatever is left of the group. Idempotent."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            if self._group_alive():
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + 3.0
                while self._group_alive() and time.monotonic() < deadline:
                    if self.proc.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(0.1)
                    else:
                        time.sleep(0.1)
                if self._group_alive():
                    self._signal_group(signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self in ProcessGroup.live:
                ProcessGroup.live.remove(self)
        return self.proc.returncode


def stop_all(grace: float = 10.0) -> None:
    for group in reversed(list(ProcessGroup.live)):
        group.stop(grace)


atexit.register(stop_all, 5.0)


def run_quiet(cmd: Sequence[str], env: dict[str, str], timeout: float, cwd: str | os.PathLike | None = None
              ) -> subprocess.CompletedProcess:
    """A short-lived command (the flwr CLI), its own session, killed with its group on timeout."""
    argv, preexec = dying_with_us(cmd)
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


# ----------------------------------------------------------------------------------------------------------
# Checks that need torch or the data run in a short-lived child, so that a launcher that lives as long as its
# Flower process does not keep torch and a dataset in memory (a client launcher stays at a few tens of MB).


def check_in_subprocess(target: str, payload: dict, timeout: float = 1800.0) -> dict:
    """Run ``target`` ("module:function", taking and returning a JSON-able dict) in a fresh interpreter.
    A LaunchError there becomes a LaunchError here (its one line); anything else, a LaunchError saying so."""
    code = "import sys\nfrom noprop.ops.processes import run_check\nsys.exit(run_check(sys.argv[1], sys.argv[2]))"
    cmd, preexec = dying_with_us([sys.executable, "-c", code, target, json.dumps(payload)])
    proc = subprocess.Popen(cmd, env=flower_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # Ctrl-C or timeout: the child goes too
        proc.kill()
        proc.communicate()
        raise
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if proc.returncode == 0:
        return json.loads(out.strip().splitlines()[-1])
    if proc.returncode == 2 and lines:
        raise LaunchError(lines[-1])
    raise LaunchError(f"checking {target} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


def run_check(target: str, payload: str) -> int:
    """The child's side of check_in_subprocess: exit 2 with a LaunchError's one line, else print the result."""
    import importlib

    module, _, name = target.partition(":")
    func = getattr(importlib.import_module(module), name)
    try:
        result = func(json.loads(payload))
    except LaunchError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
