"""Signals and supervision: SIGTERM and SIGHUP behave like Ctrl-C, and one child is run until it ends or is
stopped."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence

from noprop.ops.cli import say
from noprop.ops.processes import ProcessGroup

# ----------------------------------------------------------------------------------------------------------
# Signals: SIGTERM and SIGHUP behave like Ctrl-C (KeyboardInterrupt), so one `except` path stops everything


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def install_signal_handlers() -> None:
    def handler(signum, _frame):
        _received.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def raise_if_interrupted() -> None:
    """Re-raise a signal whose exception was swallowed: one that lands in a finalizer or an at-fork hook (seen:
    logging's _releaseLock while a subprocess was spawned) is printed as "Exception ignored" and lost, so every
    waiting loop calls this."""
    if _received:
        raise Interrupted(_received[-1])


def shield_signals() -> None:
    """While cleaning up: further Ctrl-C / SIGTERM are ignored so that the cleanup itself completes (it is
    bounded by the grace periods)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def supervise(prog: str, name: str, cmd: Sequence[str], env: dict[str, str], stopping: str,
              grace: Callable[[], float], watch: Callable[[str], None] | None = None,
              stuck: Callable[[], str | None] | None = None) -> int:
    """Run one child process group until it exits (its exit code, signals as 128 + n) or until Ctrl-C / SIGTERM
    (130); either way the group is stopped, with grace() seconds for it to exit on its own. watch sees each line
    of the child's output; when stuck() gives a reason, the child is stopped and 0 returned, as if it had ended
    on its own."""
    install_signal_handlers()
    child: ProcessGroup | None = None
    try:
        child = ProcessGroup(name, list(cmd), env, watch=watch)
        while True:
            try:
                rc = child.wait(None if stuck is None else 1.0)
                break
            except subprocess.TimeoutExpired:
                why = stuck()
                if why:
                    say(prog, f"{why}: stopping it")
                    child.stop(grace())
                    return 0
        return rc if rc >= 0 else 128 - rc
    except KeyboardInterrupt as exc:
        shield_signals()
        why = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
        say(prog, f"{why}: {stopping}")
        return 130
    finally:
        shield_signals()
        if child is not None:
            child.stop(grace())
