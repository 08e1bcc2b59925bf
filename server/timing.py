"""Where a round's time goes: the server's phases and each reply's round trip (metrics.jsonl: server_timing,
client_timing, timeline)."""

from __future__ import annotations

import time


class PhaseClock:
    """Wall seconds of a round's phases, in the order they ran (metrics.jsonl: server_timing)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.parts[phase] = self.parts.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start

    def phases(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.parts.items()}


CLIENT_PHASES = ("time-to-handler-s", "time-worker-start-s", "time-imports-s", "time-data-s", "time-model-s",
                 "train-time-s", "time-reply-s", "time-relay-s")


def client_timing(metrics: dict) -> dict[str, float]:
    """The time parts a train reply reports (those of them it has), in seconds."""
    return {k[:-2].removeprefix("time-").replace("-", "_"): round(float(metrics[k]), 3)
            for k in CLIENT_PHASES if isinstance(metrics.get(k), int | float)}


def reply_timeline(metrics: dict, pushed_at: float, arrived_at: float | None) -> dict[str, float]:
    """A reply's round trip in parts (seconds): push -> the ClientApp process's start (the SuperNode's and
    SuperExec's polling), -> the ClientApp's import (Flower's start, the message pull, the app's install), -> the
    handler, the handler, and handler end -> arrival at the server (the push back, polling); cpu_process is that
    process's CPU seconds up to the handler's end. Parts the reply cannot tell (simulation: no process start) are
    left out."""
    points = [pushed_at, *(metrics.get(k) for k in ("clock-process-start", "clock-app-import", "clock-handler-start",
                                                    "clock-handler-end")), arrived_at]
    names = ("to_process", "to_app", "to_handler", "handler", "back")
    known = [(i, p) for i, p in enumerate(points) if isinstance(p, int | float)]
    parts = {}
    for (i, a), (j, b) in zip(known, known[1:]):
        parts["+".join(names[i:j])] = round(b - a, 3)
    if isinstance(metrics.get("cpu-process-s"), int | float):
        parts["cpu_process"] = round(float(metrics["cpu-process-s"]), 3)
    return parts
