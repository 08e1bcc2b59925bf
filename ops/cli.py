"""One-line errors and messages: what every console script prints when a user has something to fix."""

from __future__ import annotations

import argparse
import sys


class LaunchError(Exception):
    """A problem the user can fix; the message is one line saying what and how."""


def fail(prog: str, message: str, code: int = 2) -> int:
    """Print ``prog: error: message`` (one line) to stderr and return ``code``."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return code


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that description and epilog keep their line breaks, and a line indented by two
    spaces (an example command) is printed as written, not wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith("  ") else super(HelpFormatter, self)._fill_text(
            line, width, indent) for line in text.splitlines())


def examples(*commands: str) -> str:
    """An epilog of example commands, one a line (tests/test_help.py parses each with its command's parser)."""
    return "Examples:\n" + "\n".join(f"  {c}" for c in commands)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``, exit 2) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --round must not silently mean --round-timeout
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise SystemExit(fail(self.prog, f"{message} (see {self.prog} --help)"))


def say(prog: str, message: str) -> None:
    """A progress line, tagged with the program, flushed at once (launchers run under log collectors)."""
    print(f"[{prog}] {message}", flush=True)
