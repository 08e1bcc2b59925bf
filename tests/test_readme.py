"""The README as a new user follows it (issue 27): every noprop-* command in its code blocks parses with that
command's parser (no training runs), every `--flag` it names for a command exists in that command's parser, every
flag it names in prose exists in some noprop-* command, and it links nothing outside the repository."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from test_help import PARSERS, all_parsers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(r"^(?:\.venv/bin/)?(noprop-[a-z]+)\b")
PLACEHOLDERS = {"$CKPT": "runs/fed/checkpoint.pt"}  # shell variables the README sets in the same block
OTHER_TOOLS = ("pip ", "make ", "python", "scp ", "flwr ", "FLWR_HOME=", "source ", "git ", "ssh-keygen", "bench/")


def sections() -> list[tuple[str, str]]:
    text = README.read_text()
    parts = re.split(r"(?m)^(?=## )", text)
    return [(p.partition("\n")[0], p) for p in parts]


def code_commands() -> list[tuple[str, str]]:
    """(section title, command line) for every noprop-* line of the README's code blocks (continuations joined,
    comments dropped)."""
    found = []
    for title, body in sections():
        for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                if COMMAND.match(line):
                    found.append((title, line))
    return found


def flags_of(command: str, sub: str | None = None) -> set[str]:
    parsers = all_parsers(PARSERS[command]())
    if sub is not None:
        parsers = [p for p in parsers if p.prog.endswith(f" {sub}")] or parsers
    return {s for p in parsers for a in p._actions for s in a.option_strings}


def subcommand(command: str, words: list[str]) -> str | None:
    subs = {p.prog.split()[-1] for p in all_parsers(PARSERS[command]())[1:]}
    return words[0] if words and words[0] in subs else None


def test_the_readme_has_commands_to_check():
    commands = {COMMAND.match(line).group(1) for _, line in code_commands()}
    assert {"noprop-train", "noprop-sim", "noprop-server", "noprop-client", "noprop-certs", "noprop-export",
            "noprop-edge"} <= commands, commands


@pytest.mark.parametrize("title, line", code_commands())
def test_every_readme_command_parses(title, line, capsys):
    for name, value in PLACEHOLDERS.items():
        line = line.replace(name, value)
    command, *argv = shlex.split(line.removeprefix(".venv/bin/"))
    unknown = [f for f in FLAG.findall(" ".join(argv)) if f not in flags_of(command, subcommand(command, argv))]
    assert not unknown, f"{title}: {line}: {command} has no {unknown}"
    if "..." in argv:  # an elided command: its flags exist, it is not meant to run as written
        return
    try:
        PARSERS[command]().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{title}: `{line}` does not parse (exit {exc.code}): {capsys.readouterr().err.strip()}")


def inline_spans() -> list[tuple[str, str]]:
    out = []
    for title, body in sections():
        prose = re.sub(r"```.*?```", "", body, flags=re.S)
        out += [(title, span) for span in re.findall(r"`([^`\n]+)`", prose)]
    return out


def test_every_flag_the_readme_names_exists():
    """A span that starts with a command (`noprop-client --server HOST`) names flags of that command (of its
    subcommand, for noprop-edge and noprop-data); a bare `--flag` must be a flag of some noprop-* command."""
    every = set().union(*(flags_of(c) for c in PARSERS))
    missing = []
    for title, span in inline_spans():
        if span.startswith(OTHER_TOOLS):
            continue
        flags = FLAG.findall(span)
        if not flags:
            continue
        words = span.split()
        m = COMMAND.match(span)
        known = flags_of(m.group(1), subcommand(m.group(1), words[1:])) if m else every
        missing += [f"{title}: `{span}`: {f}" for f in flags if f not in known]
    assert not missing, "\n".join(missing)


def test_commands_are_called_one_way():
    """After make, every command in a code block is .venv/bin/noprop-... (bare noprop-edge only on the edge device,
    where pip puts it on the PATH)."""
    bare = [f"{title}: {line}" for title, line in code_commands()
            if not line.startswith(".venv/bin/") and not title.startswith("## Deploy to a device")]
    assert not bare, "\n".join(bare)


def test_no_links_outside_the_repository():
    text = README.read_text()
    assert "../" not in text
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        assert not re.match(r"[a-z]+:", target), target
        assert (ROOT / target).exists(), target


def test_the_parsers_are_argparse():  # the helpers above read argparse internals
    assert all(isinstance(p, argparse.ArgumentParser) for c in PARSERS for p in all_parsers(PARSERS[c]()))
