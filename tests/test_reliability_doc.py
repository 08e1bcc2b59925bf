"""RELIABILITY.md's tables cite tests: every cited test must exist, so that the tables cannot go stale.

A cite is a backticked `tests/FILE.py`, `tests/FILE.py::NAME[ID]`, a bare `NAME[ID]` (a test of a file cited
before it in the same row, or of the file the section names) or a bare `[ID]` (another parameter of the test
cited just before). The bad-input table is generated from BAD_INPUT: its row ids and phrases must match it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "RELIABILITY.md"
FULL = re.compile(r"^(tests/[\w/]+\.py)(?:::(\w+)(\[[^\]`]+\])?)?$")
BARE = re.compile(r"^(test_\w+)(\[[^\]`]+\])?$")
PARAM = re.compile(r"^\[([^\]`]+)\]$")


def sections() -> list[tuple[str, str, list[str]]]:
    """(section title, its text, its table rows)."""
    out = []
    for part in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("|---")]
        out.append((title, body, rows[1:]))  # rows[0] is the header
    return out


def cites() -> list[tuple[str, str, str | None, str | None]]:
    """(where, file, test name or None, parameter id or None) for every test a table row cites."""
    found = []
    for title, body, rows in sections():
        named = re.search(r"Tests in `(tests/[\w/]+\.py)`", body)
        files = [named.group(1)] if named else []  # "same": a row may go on with a file cited in a row above
        for row in rows:
            last: tuple[str, str] | None = None
            for span in re.findall(r"`([^`]+)`", row):
                where = f"{title}: {span}"
                if m := FULL.match(span):
                    files.append(m.group(1))
                    found.append((where, m.group(1), m.group(2), m.group(3)))
                    last = (m.group(1), m.group(2)) if m.group(2) else last
                elif m := BARE.match(span):
                    owner = next((f for f in reversed(files) if defines(f, m.group(1))), files[-1] if files else "?")
                    found.append((where, owner, m.group(1), m.group(2)))
                    last = (owner, m.group(1))
                elif (m := PARAM.match(span)) and last:
                    found.append((where, last[0], last[1], span))
    return found


def defines(file: str, name: str) -> bool:
    path = ROOT / file
    return path.exists() and re.search(rf"^(async )?def {name}\(", path.read_text(), flags=re.M) is not None


@pytest.fixture(scope="module")
def collected() -> set[str]:
    """The node ids pytest collects from the cited files (collection only: no test runs)."""
    files = sorted({f for _, f, _, _ in cites() if (ROOT / f).exists()})
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {line.strip() for line in res.stdout.splitlines() if "::" in line}


def test_the_tables_cite_tests():
    found = cites()
    assert len(found) >= 40, found  # the parser still reads the tables
    assert any(name and name.startswith("test_rogue_node") and param for _, _, name, param in found), found


def test_every_test_reliability_md_cites_exists(collected):
    missing = []
    for where, file, name, param in cites():
        if not (ROOT / file).exists():
            missing.append(f"{where}: no file {file}")
        elif name and not defines(file, name):
            missing.append(f"{where}: no test {name} in {file}")
        elif name and param and f"{file}::{name}{param}" not in collected:
            missing.append(f"{where}: {file}::{name} has no parameter {param}")
        elif name and not param and not any(i == f"{file}::{name}" or i.startswith(f"{file}::{name}[")
                                            for i in collected):
            missing.append(f"{where}: {file}::{name} is not collected")
    assert not missing, "\n".join(missing)


def test_the_bad_input_table_matches_bad_input():
    from test_bad_input import BAD_INPUT

    rows = next(rows for title, _, rows in sections() if title.startswith("Bad input"))
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        table[cells[0]] = cells[-1]
    assert list(table) == [row.id for row in BAD_INPUT], sorted(set(table) ^ {row.id for row in BAD_INPUT})
    stale = {row.id: (table[row.id], row.phrase) for row in BAD_INPUT if table[row.id] != row.phrase}
    assert not stale, stale
