"""noprop.io.atomic_write: a write cut off midway (an exception, a failed fsync or rename, a killed process)
leaves the previous file whole and no partial file in its place."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys

import pytest

from noprop import io as nio

OLD = b"the previous checkpoint, whole\n" * 100


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "out" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(OLD)
    return path


def leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_a_write_that_completes_replaces_the_file_whole_and_0600(target):
    nio.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and leftovers(target) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # mkstemp's mode: a secret is never readable by others
    nio.atomic_write(target, lambda f: f.write(b"newer"), mode=0o644)
    assert target.read_bytes() == b"newer" and stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_write_that_fails_after_partial_bytes_leaves_the_previous_file_intact(target):
    def half_then_fail(f):
        f.write(b"half of the new one")
        f.flush()
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space left"):
        nio.atomic_write(target, half_then_fail)
    assert target.read_bytes() == OLD
    assert leftovers(target) == []  # the temporary file is removed too


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failed_fsync_or_rename_leaves_the_previous_file_intact(target, monkeypatch, step):
    def fail(*_args, **_kwargs):
        raise OSError(f"{step} failed")

    monkeypatch.setattr(nio.os, step, fail)
    with pytest.raises(OSError, match=f"{step} failed"):
        nio.atomic_write(target, lambda f: f.write(b"all of the new one"))
    monkeypatch.undo()
    assert target.read_bytes() == OLD and leftovers(target) == []


def test_an_interrupt_midway_leaves_the_previous_file_intact(target):
    def interrupted(f):
        f.write(b"x" * 10)
        raise KeyboardInterrupt  # Ctrl-C: a BaseException, not an Exception

    with pytest.raises(KeyboardInterrupt):
        nio.atomic_write(target, interrupted)
    assert target.read_bytes() == OLD and leftovers(target) == []


def test_a_process_killed_midway_leaves_the_previous_file_intact(target):
    """SIGKILL while the new bytes are being written: no handler runs, so only the write-then-rename order can
    keep the previous file (a temporary file may be left behind, never the target half-written)."""
    code = (
        "import os, signal, sys\n"
        "from noprop.io import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'partial new bytes')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert target.read_bytes() == OLD
    assert all(name.endswith(".tmp") for name in leftovers(target)), leftovers(target)

