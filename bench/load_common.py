"""What the two load benchmarks (load_edge.py, load_server.py) share: the machine and its load, memory of a
process tree sampled with psutil (the peak from /proc: see benchlib), and a trend over the samples."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from benchlib import cpu_model, peak_rss_kb, rss_kb  # bench/ is on sys.path: these scripts run from there


def machine() -> dict:
    return {"cpu": cpu_model(), "cpus": psutil.cpu_count(), "arch": platform.machine(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version()}


def uptime() -> str:
    """`uptime` as the shell prints it: other agents share the cores, so every result records the load."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def pss_kb(pid: int) -> int | None:
    """Proportional set size: shared pages (torch's libraries in every worker) counted once across a tree."""
    try:
        return psutil.Process(pid).memory_full_info().pss // 1024
    except psutil.Error:
        return None


def process_name(pid: int) -> str:
    """The command line, shortened: `python -m noprop.ops.sim ...`, `ray::ClientAppActor`, `raylet`."""
    try:
        text = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"
    return text if len(text) <= 80 else text[:77] + "..."


def descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


class MemorySampler:
    """Every `interval` s on a thread: RSS and peak RSS (VmHWM) of one process (`pid`, or the one `focus` finds),
    and with `tree` the summed RSS and PSS of `pid` and all its descendants. Samples are (seconds since start,
    rss_mb, hwm_mb[, tree_rss_mb, tree_pss_mb, processes])."""

    def __init__(self, pid: int, interval: float = 0.5, tree: bool = False,
                 focus: Callable[[], int | None] | None = None):
        self.pid, self.interval, self.tree = pid, interval, tree
        self.focus = focus  # finds the process whose own RSS is reported (default: pid)
        self.samples: list[tuple[float, ...]] = []
        self.peak_tree: dict = {}  # the tree's processes (name: RSS MB) at the largest summed PSS
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def mark(self, name: str) -> float:
        self.marks[name] = self.now()
        return self.marks[name]

    def now(self) -> float:
        return time.monotonic() - self._start

    def _run(self) -> None:
        while not self._stop.is_set():
            focus = self.focus() if self.focus is not None else self.pid
            rss = rss_kb(focus) if focus else None
            hwm = peak_rss_kb(focus) if focus else None
            row: tuple[float, ...] = (self.now(), (rss or 0) / 1024, (hwm or 0) / 1024)
            if self.tree:
                pids = descendants(self.pid) | {self.pid}
                rss_of = {p: rss_kb(p) or 0 for p in pids}
                pss_sum = sum(pss_kb(p) or 0 for p in pids) / 1024
                row = (*row, sum(rss_of.values()) / 1024, pss_sum, len(pids))
                if pss_sum > self.peak_tree.get("pss_mb", 0):
                    self.peak_tree = {"pss_mb": round(pss_sum, 1), "at_s": round(row[0], 1), "processes": [
                        {"pid": p, "name": process_name(p), "rss_mb": round(kb / 1024, 1)}
                        for p, kb in sorted(rss_of.items(), key=lambda item: -item[1]) if kb]}
            if rss is not None or self.tree:
                self.samples.append(row)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def column(self, index: int, start: float = 0.0, end: float = float("inf")) -> tuple[np.ndarray, np.ndarray]:
        rows = [s for s in self.samples if start <= s[0] <= end]
        return np.array([s[0] for s in rows]), np.array([s[index] for s in rows])


def slope_mb_per_min(t: np.ndarray, mb: np.ndarray) -> float:
    """Least-squares slope of memory over time."""
    if len(t) < 3 or np.ptp(t) == 0:
        return 0.0
    return float(np.polyfit(t, mb, 1)[0] * 60.0)


def percentile_ms(seconds: np.ndarray, q: float) -> float:
    return float(np.percentile(seconds, q) * 1e3)


def run_or_report(args, run, markdown, succeeded) -> int:
    """A load benchmark's main: --report re-prints the markdown of the saved JSON; otherwise run, save the
    result atomically, print the markdown; exit 0 only when the run succeeded."""
    path = Path(args.json)
    if args.report:
        print(markdown(json.loads(path.read_text())))
        return 0
    from noprop.io import atomic_write_text

    result = run(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {path}", file=sys.stderr)
    return 0 if succeeded(result) else 1
