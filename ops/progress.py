"""Following a run from the launcher: a line per round from OUT/metrics.jsonl, and the run log echoed."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


class MetricsTail:
    """New complete lines of OUT/metrics.jsonl. Lines already there at the start are skipped; a file that is
    replaced (a fresh run unlinks the old one) is read from its start."""

    def __init__(self, path: Path):
        self.path = path
        st = self._stat()
        self.offset = st.st_size if st else 0
        self.ino = st.st_ino if st else None
        self.buffer = b""

    def _stat(self):
        try:
            return self.path.stat()
        except OSError:
            return None

    def poll(self) -> list[dict]:
        st = self._stat()
        if st is None:
            if self.ino is not None:
                self.ino, self.offset, self.buffer = None, 0, b""
            return []
        if st.st_ino != self.ino or st.st_size < self.offset:
            self.ino, self.offset, self.buffer = st.st_ino, 0, b""
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        data = self.buffer + chunk
        *lines, self.buffer = data.split(b"\n")
        records = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    records.append(value)
        return records


class LogFollower:
    """Echo new lines of a growing text file (the run log) to stdout."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size <= self.offset:  # a restarted stream rewrites the same log from its start: wait until it is past
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        cut = chunk.rfind(b"\n") + 1
        if cut:
            sys.stdout.write(chunk[:cut].decode(errors="replace"))
            sys.stdout.flush()
            self.offset += cut
