"""What the benchmarks share: memory readings, the CPU's name, and running one measured cell in a fresh process.

A fresh process per cell makes its peak resident memory (VmHWM) its own: nothing earlier in the
benchmark's life inflates it. The child prints one line "RESULT <json>"; the parent echoes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil


def rss_kb(pid: int | None = None) -> int | None:
    """Resident memory of a process (this one by default) now, in kB; None once it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss // 1024
    except psutil.Error:
        return None


def peak_rss_kb(pid: int | None = None) -> int | None:
    """Peak resident memory (VmHWM) of a process, in kB; None once it is gone. psutil reports no peak on Linux
    (its peak_wset is Windows'), and getrusage's ru_maxrss survives execve and clear_refs, so /proc it is."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory() -> bool:
    """Make VmHWM restart from the current RSS (Linux 4.0+: write 5 to /proc/self/clear_refs); False if refused.
    No library offers it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; psutil and platform.processor() give none on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_child(cmd: list[str], label: str) -> dict | None:
    """Run cmd (a script invocation that prints a RESULT line); echo its output; its result or None on failure."""
    print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")), flush=True)
    if proc.returncode != 0 or not lines:
        print(f"{label} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def print_result(result: dict) -> None:
    """The child's side of run_child."""
    print("RESULT " + json.dumps(result), flush=True)


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put section (which starts with the line heading, a '## ' title) in place of that section of the markdown
    file, up to the next '## ' title, or append it; the other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = [""] + lines[end:] if end < len(lines) else []
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + rest) + "\n"
    path.write_text(new)
