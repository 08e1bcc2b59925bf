"""What the training benchmarks share: memory readings and running one measured cell in a fresh process.

A fresh process per cell makes its peak resident memory (VmHWM) its own: nothing earlier in the
benchmark's life inflates it. The child prints one line "RESULT <json>"; the parent echoes the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def memory_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in kB, from /proc/self/status (0 where there is none)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_memory() -> bool:
    """Make VmHWM restart from the current RSS (Linux 4.0+: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


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
