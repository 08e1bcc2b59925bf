"""What the two load benchmarks (load_edge.py, load_server.py) share: the machine and its load, memory of a
process tree sampled from /proc, and a trend over the samples. Linux only (/proc)."""

from __future__ import annotations

import contextlib
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


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cpus": os.cpu_count(), "arch": platform.machine(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version()}


def uptime() -> str:
    """`uptime` as the shell prints it: other agents share the cores, so every result records the load."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def status_kb(pid: int, field: str) -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kb(pid: int) -> int | None:
    """Proportional set size: shared pages (torch's libraries in every worker) counted once across a tree."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_name(pid: int) -> str:
    """The command line, shortened: `python -m noprop.server.sim ...`, `ray::ClientAppActor`, `raylet`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    return text if len(text) <= 80 else text[:77] + "..."


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


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
            rss = status_kb(focus, "VmRSS") if focus else None
            hwm = status_kb(focus, "VmHWM") if focus else None
            row: tuple[float, ...] = (self.now(), (rss or 0) / 1024, (hwm or 0) / 1024)
            if self.tree:
                pids = descendants(self.pid) | {self.pid}
                rss_of = {p: status_kb(p, "VmRSS") or 0 for p in pids}
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
