"""Every command's --help as a new user reads it (issue 27): the examples in it parse, defaults are shown (and say
what an unset default means), choices are listed, one placeholder style, and Flower's names are accepted."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable

import pytest

from noprop.client import launcher as client_launcher
from noprop.deploy import edge_cli, export_cli
from noprop.federation import FederationConfig
from noprop.ops import certs, data_cli, sim, train_cli
from noprop.ops import server_cli as server_launcher
from noprop.ops.run_flags import APPLIES_TO, FEDERATION_FLAGS, federation_config_from_args, ignored_settings

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "noprop-train": train_cli.build_parser, "noprop-data": data_cli._parser, "noprop-export": export_cli.build_parser,
    "noprop-edge": edge_cli.build_parser, "noprop-server": server_launcher.build_parser,
    "noprop-client": client_launcher.build_parser, "noprop-sim": sim.build_parser, "noprop-certs": certs.build_parser,
}
OURS = ("noprop-train", "noprop-edge", "noprop-server", "noprop-client", "noprop-sim", "noprop-certs")  # issue 27's


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """argv parsed by the command's parser; a usage error fails the test with argparse's message."""
    try:
        return PARSERS[command]().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{command} {shlex.join(argv)} does not parse (exit {exc.code})")


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its subcommands' parsers."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += all_parsers(sub)
    return found


def options(command: str) -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    return [(p, a) for p in all_parsers(PARSERS[command]()) for a in p._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def example_lines(command: str) -> list[str]:
    return [line.strip() for p in all_parsers(PARSERS[command]()) for line in (p.epilog or "").splitlines()
            if line.startswith("  noprop-")]


@pytest.mark.parametrize("command", OURS)
def test_every_example_in_the_help_parses(command, capsys):
    lines = example_lines(command)
    assert lines, f"{command} --help shows no example"
    for line in lines:
        name, *argv = shlex.split(line)
        parse(name, argv)
    assert not capsys.readouterr().err


def test_the_launchers_examples_pass_a_security_choice():
    """noprop-server's and noprop-client's examples would fail without --certificates / --insecure (server) or
    --root-certificate / --insecure (client): each one carries one."""
    for command in ("noprop-server", "noprop-client", "noprop-certs"):
        for line in example_lines(command):
            name, *argv = shlex.split(line)
            if name in ("noprop-server", "noprop-client"):
                args = parse(name, argv)
                choice = args.certificates if name == "noprop-server" else args.root_certificate
                assert bool(choice) != bool(args.insecure), line


@pytest.mark.parametrize("command", OURS)
def test_defaults_are_shown_and_say_what_unset_means(command):
    for parser, action in options(command):
        text = action.help or ""
        where = f"{parser.prog} {action.option_strings[0]}: {text!r}"
        assert "(default: '')" not in text and "(default: None)" not in text and "(default: ''" not in text, where
        assert text.count("(default") <= 1, where  # not twice
        if action.default not in (None, False, argparse.SUPPRESS) or parser.prog in ("noprop-sim", "noprop-server") \
                and action.dest.startswith("cfg_"):
            assert "(default" in text, where


@pytest.mark.parametrize("command", OURS)
def test_one_placeholder_style(command):
    """Placeholders are upper case words (N, X, S, DIR, FILE, SPEC, HOST:PORT) or a value's form (one-hot|learned:D,
    {a,b}): never argparse's own DEST_NAME, never with an underscore."""
    for parser, action in options(command):
        if action.nargs == 0:
            continue
        if action.metavar is None:  # argparse shows {a,b} for choices, else DEST_NAME
            assert action.choices, f"{parser.prog} {action.option_strings[0]} {action.dest.upper()}"
            continue
        assert "_" not in str(action.metavar), f"{parser.prog} {action.option_strings[0]} {action.metavar}"


def test_choices_are_listed():
    for command, flags in (("noprop-sim", ("--method", "--policy", "--head", "--norm", "--aggregation", "--solver",
                                           "--eval-mode")),
                           ("noprop-train", ("--method", "--head", "--norm", "--solver", "--eval-mode"))):
        shown = {a.option_strings[0]: a for _, a in options(command)}
        for flag in flags:
            assert (shown[flag].metavar or "").startswith("{") or shown[flag].choices, (command, flag)


def test_method_marks_follow_the_code():
    """A mark ("dt:", "dt, backprop:") names the methods whose code reads the setting; unmarked ones apply to all."""
    marks = {name: (spec.help or "").split(":")[0] for name, spec in FEDERATION_FLAGS.items()}
    assert marks["eval_in_background"] != "dt"  # the run loop evaluates in the background for every method
    assert marks["norm"] == "dt, backprop" and marks["T"] == "dt, backprop"
    assert marks["clip"] == "dt" and marks["policy"] == "dt" and marks["replicas"] == "dt"
    assert marks["eta"] == "dt, ct"
    sim_help = sim.build_parser().format_help()
    assert re.search(r"--min-nodes N, --min-clients N\s+clients that must connect before the first round\s+"
                     r"\(default: --clients", sim_help), sim_help


def test_a_setting_another_method_ignores_is_said(tmp_path):
    parser = sim.build_parser()
    cfg, overrides = federation_config_from_args(parser.parse_args(["--method", "ct", "--clip", "0.001", "--T", "4"]),
                                                 resolve_paths=False)
    warnings = ignored_settings(cfg, overrides)
    assert any("--clip applies to dt only: ignored for --method ct" in w for w in warnings), warnings
    assert any(w.startswith("WARNING: --t ") or "--T applies" in w for w in warnings), warnings
    cfg, overrides = federation_config_from_args(parser.parse_args(["--clip", "0.001"]), resolve_paths=False)
    assert ignored_settings(cfg, overrides) == []


def test_every_method_mark_in_the_help_is_a_warning_and_every_warning_a_mark():
    """The help's marks ("dt:", "dt, backprop:") and APPLIES_TO, which the warning reads, say the same: a dt-only
    flag given to cnn (--coverage-step, --client-eval, ...) is said to be ignored, not silently dropped."""
    methods = {"dt", "ct", "fm", "adjoint", "backprop", "cnn"}
    for name, spec in FEDERATION_FLAGS.items():
        if name == "method":  # its help describes the methods themselves
            continue
        mark = re.match(r"([a-z]+(?:, [a-z]+)*): ", spec.help or "")
        marked = set(mark.group(1).split(", ")) if mark else set()
        if marked <= methods and marked:
            assert name in APPLIES_TO and marked <= set(APPLIES_TO[name]), (name, marked, APPLIES_TO.get(name))
        else:
            assert name not in APPLIES_TO, (name, spec.help)
    parser = sim.build_parser()
    cfg, overrides = federation_config_from_args(
        parser.parse_args(["--method", "cnn", "--no-coverage-step", "--client-eval"]), resolve_paths=False)
    warnings = ignored_settings(cfg, overrides)
    assert any("--coverage-step applies to dt only: ignored for --method cnn" in w for w in warnings), warnings
    assert not any("--client-eval" in w for w in warnings), warnings  # every method's nodes evaluate


def test_flowers_names_are_aliases(tmp_path):
    args = parse("noprop-client", ["--superlink", "10.0.0.2:9092", "--root-certificates", "ca.crt", "--data",
                                   "mnist"])
    assert (args.server, args.root_certificate) == ("10.0.0.2:9092", "ca.crt")
    args = parse("noprop-server", ["--num-server-rounds", "7", "--insecure"])
    cfg, _ = federation_config_from_args(args, resolve_paths=False)
    assert cfg.num_rounds == 7


def test_config_reads_a_flower_apps_run_config_table(tmp_path):
    """--config pyproject.toml of a Flower app: its [tool.flwr.app.config], Flower's num-server-rounds included."""
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "app"\n\n[tool.flwr.app.components]\nserverapp = "x:app"\n\n'
                    '[tool.flwr.app.config]\nnum-server-rounds = 3\nlocal-epochs = 2\nlr = 0.01\n')
    args = server_launcher.build_parser().parse_args(["--config", str(path), "--insecure", "--lr", "0.02"])
    cfg, overrides = federation_config_from_args(args, resolve_paths=False)
    assert (cfg.num_rounds, cfg.local_epochs, cfg.lr) == (3, 2, 0.02)
    assert set(overrides) == {"num_rounds", "local_epochs", "lr"}
    path.write_text('[tool.flwr.app.components]\nserverapp = "x:app"\n')
    with pytest.raises(Exception, match=r"\[tool\] table without \[tool.flwr.app.config\]"):
        federation_config_from_args(server_launcher.build_parser().parse_args(["--config", str(path)]),
                                    resolve_paths=False)
    assert FederationConfig().num_rounds != 3


def test_sim_checks_its_data_before_ray_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sim, "apply_flower_env", lambda *a: pytest.fail("reached Ray's set-up"))
    for flags, phrase in ((["--dataset", "nosuchdata"], "--dataset nosuchdata: unknown dataset"),
                          (["--client-data", "nosuchdata"], "--client-data nosuchdata: unknown dataset")):
        args = sim.build_parser().parse_args([*flags, "--out", str(tmp_path / "out")])
        cfg, _ = federation_config_from_args(args)
        assert sim.simulate(cfg, args, 1) == 2
        assert phrase in capsys.readouterr().err


def test_client_resolves_the_server_name_before_loading_data(monkeypatch, capsys):
    monkeypatch.setattr(client_launcher, "check_in_subprocess", lambda *a: pytest.fail("loaded the data first"))
    assert client_launcher.main(["--server", "nosuchhost.invalid", "--insecure", "--data", "mnist"]) == 2
    assert "--server nosuchhost.invalid:9092: the name nosuchhost.invalid does not resolve" in capsys.readouterr().err
