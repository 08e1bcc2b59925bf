"""The launchers without a federation: flags generated from FederationConfig, one-line errors with exit 2,
the generated Flower app, node-config quoting through Flower's own parser, and process-group cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from procs import alive, descendants, quiet_env, script, wait_for, write_synthetic_npz

from noprop.client import launcher as client_launcher
from noprop.federation import FederationConfig
from noprop.ops import flower_app, sim
from noprop.ops import server_cli as server_launcher
from noprop.ops.cli import LaunchError
from noprop.ops.flower import config_string
from noprop.ops.network import free_port, parse_address
from noprop.ops.processes import ProcessGroup
from noprop.ops.report import round_line
from noprop.ops.run_flags import FEDERATION_FLAGS, federation_config_from_args, resolve_dataset_spec
from noprop.settings import flag_name

# a valid, non-default value for each field (fields added later fall back to a generic one per type)
VALID = {"policy": "replicate", "embedding": "learned:8", "head": "radial", "eval_mode": "stochastic",
         "channels": "8,16,32", "partition_type": "dirichlet:0.5", "dataset": "mnist", "client_data": "cifar10",
         "data_root": "/tmp/somewhere", "out": "/tmp/run-out"}


def non_default(f) -> tuple[list[str], object]:
    default = getattr(FederationConfig, f.name)
    flag = flag_name(f.name)
    if isinstance(default, bool):
        return ([flag] if not default else [f"--no-{flag[2:]}"]), not default
    if isinstance(default, int):
        return [flag, str(default + 3)], default + 3
    if isinstance(default, float):
        value = default / 2 if default else 0.5
        return [flag, repr(value)], value
    value = VALID.get(f.name, "x")
    return [flag, value], value


@pytest.fixture
def npz(tmp_path):
    return write_synthetic_npz(tmp_path / "task.npz", 200, 80)


@pytest.mark.parametrize("parser_factory", [server_launcher.build_parser, sim.build_parser])
def test_every_federation_field_has_a_flag(parser_factory):
    parser = parser_factory()
    for f in fields(FederationConfig):
        argv, value = non_default(f)
        args = parser.parse_args(argv)
        assert getattr(args, f"cfg_{f.name}") == value, f.name
        others = [g.name for g in fields(FederationConfig) if g.name != f.name]
        assert all(getattr(args, f"cfg_{o}") is None for o in others), "a flag must only set its own field"
    for name, spec in FEDERATION_FLAGS.items():
        for alias in spec.aliases:
            assert getattr(parser.parse_args([alias, "7"]), f"cfg_{name}") == 7


def test_flags_and_toml_build_the_config(tmp_path):
    parser = server_launcher.build_parser()
    argv = []
    expected = {}
    for f in fields(FederationConfig):
        flag, value = non_default(f)
        if f.name in VALID or not isinstance(value, str):
            argv += flag
            expected[f.name] = value
    cfg, overrides = federation_config_from_args(parser.parse_args(argv), resolve_paths=False)
    for name, value in expected.items():
        assert getattr(cfg, name) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, name) == value
    assert set(overrides) == set(expected)
    # TOML: field names with dashes or underscores; flags win; relative paths become absolute
    toml = tmp_path / "run.toml"
    toml.write_text('rounds = 9\nlocal_epochs = 4\npolicy = "replicate"\nout = "rel/out"\nchannels = [4, 8, 8]\n')
    cfg, _ = federation_config_from_args(parser.parse_args(["--config", str(toml), "--local-epochs", "2"]))
    assert (cfg.num_rounds, cfg.local_epochs, cfg.policy, cfg.channels) == (9, 2, "replicate", "4,8,8")
    assert cfg.out.startswith("/") and cfg.out.endswith("rel/out")


@pytest.mark.e2e
def test_run_settings_are_read_and_checked_without_torch():
    """Importing noprop.federation, validating a FederationConfig of every method (its model config included) and
    a TrainConfig, and the launchers' flags to a checked config, import no torch: a launcher that lives as long
    as its Flower processes does not hold torch's ~500 MB."""
    code = ("import sys\n"
            "from noprop.federation import FederationConfig\nfrom noprop.methods import METHODS\n"
            "for method in METHODS:\n"
            "    FederationConfig(method=method).validate()\n"
            "from noprop.config import TrainConfig\n"
            "TrainConfig(method='ct', steps=4).validate().model_config((1, 8, 8), 2)\n"
            "from noprop.client import launcher as client_launcher\n"
            "from noprop.ops.run_flags import federation_config_from_args\n"
            "from noprop.ops import server_cli as launcher\nfrom noprop.ops import sim\n"
            "client_launcher.build_parser()\n"
            "federation_config_from_args(launcher.build_parser().parse_args(['--rounds', '2', '--method', 'fm']))\n"
            "federation_config_from_args(sim.build_parser().parse_args(['--T', '3']))\n"
            "print('torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=quiet_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", "torch was imported"


def test_generated_app_holds_every_key_and_flower_builds_it(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    cfg = FederationConfig(num_rounds=7, T=4, out="/tmp/o", dataset="npz:/tmp/x.npz", resume=True)
    path = flower_app.write_app(tmp_path / "app", cfg)
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    app = doc["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "noprop.server.app:app", "clientapp": "noprop.client.app:app"}
    assert app["config"] == cfg.to_run_config()
    assert FederationConfig.from_run_config(app["config"]) == cfg
    config, warnings = load_and_validate(path)  # Flower's own check, including that the components import
    assert not warnings, warnings
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path / "app"))).namelist()
    assert "pyproject.toml" in names and not any(n.startswith("noprop/") for n in names), names
    conn = flower_app.write_connection(tmp_path / "home", "127.0.0.1:9999")
    with open(conn, "rb") as f:
        superlink = tomllib.load(f)["superlink"]
    assert superlink["default"] == flower_app.CONNECTION
    assert superlink[flower_app.CONNECTION] == {"address": "127.0.0.1:9999", "insecure": True}


def test_node_config_survives_flowers_parser():
    from flwr.common.config import parse_config_args

    values = {"data": "npz:/data/my set/x.npz", "data-root": "C:\\data\\root", "partition-id": 2,
              "num-partitions": 5, "partition-type": "dirichlet:0.5", "note": 'say "hi"', "memory-mb": 0}
    assert parse_config_args([config_string(values)]) == values
    with pytest.raises(LaunchError):
        config_string({"x": "it's \"both\""})


def test_parse_address():
    assert parse_address("10.0.0.2:9000", 9092) == ("10.0.0.2", 9000)
    assert parse_address("myhost", 9092) == ("myhost", 9092)
    assert parse_address("[::1]:9100", 9092) == ("::1", 9100)
    for bad in ("host:notaport", "host:0", ":9092", ""):
        with pytest.raises(LaunchError):
            parse_address(bad, 9092)


def one_line_exit_2(main, argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "num-rounds=0"),
    (["--T", "many"], "--T"),
    (["--policy", "random"], "policy"),
    (["--channels", "8,16"], "channels"),
    (["--partition-type", "zipf"], "partition-type"),
    (["--embedding", "prototype"], "federated runs support one-hot and learned:D"),
    (["--round-timeout", "-1"], "round-timeout"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--round", "3"], "--round"),  # no abbreviations
    (["--authorized-keys", "/tmp"], "needs --certificates"),
    (["--port", "70000"], "out of range"),
    (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--config", "/nonexistent/run.toml"], "does not exist"),
])
def test_server_bad_values_are_one_line_and_exit_2(argv, message, capsys, tmp_path, npz):
    ports = ["--port", str(free_port()), "--control-port", str(free_port())]
    base = [*ports, "--out", str(tmp_path / "out"), "--dataset", f"npz:{npz}", "--insecure"]
    err = one_line_exit_2(server_launcher.main, [*base, *argv], capsys)
    assert err.startswith("noprop-server: error:") and message in err, err


def test_server_rejects_unknown_toml_key_and_busy_port(capsys, tmp_path, npz):
    toml = tmp_path / "run.toml"
    toml.write_text("roundz = 3\n")
    base = ["--out", str(tmp_path / "out"), "--dataset", f"npz:{npz}", "--insecure"]
    err = one_line_exit_2(server_launcher.main, [*base, "--config", str(toml)], capsys)
    assert "unknown key 'roundz'" in err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        err = one_line_exit_2(server_launcher.main, [*base, "--port", str(busy), "--control-port",
                                                     str(free_port())], capsys)
    assert "in use" in err


@pytest.mark.parametrize("argv, message", [
    (["--partition", "3/3"], "partition"),
    (["--partition", "a/b"], "I/N"),
    (["--partition-type", "dirichlet:-1"], "alpha"),
    (["--partition", "0/2", "--partition-type", "classes:9"], "K <= 4"),  # checked against the data's 4 classes
    (["--max-blocks", "-2"], "max-blocks"),
    (["--device", "tpu"], "device"),
    (["--key", "/nonexistent/client0"], "needs --root-certificate"),
    (["--server", "127.0.0.1:notaport"], "port"),
])
def test_client_bad_values_are_one_line_and_exit_2(argv, message, capsys, npz):
    base = ["--server", f"127.0.0.1:{free_port()}", "--data", f"npz:{npz}", "--wait", "0", "--insecure"]
    err = one_line_exit_2(client_launcher.main, [*base, *argv], capsys)
    assert err.startswith("noprop-client: error:") and message in err, err


def test_client_with_missing_data_fails_before_anything_starts(capsys, tmp_path):
    err = one_line_exit_2(client_launcher.main, ["--server", f"127.0.0.1:{free_port()}", "--insecure", "--data",
                                                 f"npz:{tmp_path / 'missing.npz'}"], capsys)
    assert "missing.npz" in err


@pytest.mark.e2e
def test_client_with_unreachable_server_exits_quickly_with_one_line(tmp_path, npz):
    port = free_port()  # nothing listens there
    # gives up after its --wait (a client that retried forever would hit the subprocess timeout and fail here)
    res = subprocess.run([script("noprop-client"), "--server", f"127.0.0.1:{port}", "--data", f"npz:{npz}",
                          "--partition", "0/2", "--wait", "2", "--state-dir", str(tmp_path / "home"), "--insecure"],
                         capture_output=True, text=True, env=quiet_env(), timeout=300)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noprop-client: error: no server answers at"), res.stderr
    assert "SuperNode" not in res.stdout  # nothing was started


def test_sim_bad_values_are_one_line_and_exit_2(capsys):
    err = one_line_exit_2(sim.main, ["--clients", "0"], capsys)
    assert err.startswith("noprop-sim: error:") and "--clients" in err
    err = one_line_exit_2(sim.main, ["--clients", "2", "--partition", "dirichlet"], capsys)
    assert "alpha" in err
    err = one_line_exit_2(sim.main, ["--clients", "2", "--min-clients", "3"], capsys)
    assert "--min-clients" in err


def test_sim_accepts_class_partitions_and_checks_them_against_the_data(monkeypatch, capsys, npz, tmp_path):
    started = []
    monkeypatch.setattr(sim, "run_in_child", lambda argv: started.append(argv) or 0)
    assert sim.main(["--clients", "2", "--partition", "classes:2", "--dataset", f"npz:{npz}",
                     "--out", str(tmp_path / "out")]) == 0
    assert started and "classes:2" in started[0]
    err = one_line_exit_2(sim.main, ["--clients", "2", "--partition", "classes:0"], capsys)
    assert "K must be at least 1" in err
    sim.check_class_partitions(FederationConfig(dataset=f"npz:{npz}", partition_type="classes:2"), 2)
    with pytest.raises(LaunchError, match="cannot hold all 4 classes"):  # 2 clients x 1 class: 2 classes unused
        sim.check_class_partitions(FederationConfig(dataset=f"npz:{npz}", partition_type="classes:1"), 2)


@pytest.mark.e2e
def test_process_group_stop_ends_the_whole_tree(tmp_path):
    # a leader that ignores SIGTERM and a grandchild in its group: both must be gone after stop()
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    group = ProcessGroup("test", [sys.executable, "-c", code], quiet_env(), log_path=tmp_path / "log")
    wait_for(lambda: descendants(group.pid), 120, interval=0.1, what="the leader's child")
    tree = descendants(group.pid) | {group.pid}
    assert len(tree) == 2
    group.stop(grace=1.0)  # the leader ignores SIGTERM: only the escalation to SIGKILL ends it
    wait_for(lambda: not [pid for pid in tree if alive(pid)], 60, interval=0.1, what="the whole group gone")
    assert group not in ProcessGroup.live


@pytest.mark.e2e
def test_console_scripts_report_errors_in_one_line(tmp_path):
    res = subprocess.run([script("noprop-server"), "--rounds", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=quiet_env(), timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("noprop-server: error: num-rounds=0")
    help_text = subprocess.run([script("noprop-sim"), "--help"], capture_output=True, text=True, env=quiet_env(),
                               timeout=120).stdout
    for f in fields(FederationConfig):
        assert flag_name(f.name) in help_text, f.name


def test_signal_handlers_turn_sigterm_into_interrupt():
    from noprop.ops.supervision import Interrupted, install_signal_handlers

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        install_signal_handlers()
        with pytest.raises(KeyboardInterrupt) as info:
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(info.value, Interrupted) and info.value.signum == signal.SIGTERM
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_round_line_shows_the_round_beside_its_slowest_training():
    record = {"round": 2, "accuracy": 0.5, "round_time_s": 75.5, "nodes": [1, 2],
              "client_train_time_s": {"1": 40.0, "2": 63.4}}
    line = round_line(record, 4)
    assert "75.5 s (slowest client's training 63.4 s)" in line and "2 nodes" in line, line
    del record["client_train_time_s"]  # a FedAvg line, or one from before issue 11
    assert "75.5 s, 2 nodes" in round_line(record, 4)
    # a block-ownership round: blocks some owner trained (node 2's reply was rejected), of T = covered + uncovered
    record.update(plan={"1": [1], "2": [2]}, uncovered=[3], trained_by=[1], mean_l2=0.25,
                  rejected={"2": "round 1, expected 2"})
    line = round_line(record, 4)
    assert "blocks trained 1/3, mean denoising loss 0.2500, 75.5 s, 2 nodes" in line, line
    assert line.endswith("reply of node 2 rejected: round 1, expected 2"), line


@pytest.mark.e2e
def test_a_supernode_stuck_after_the_server_forgot_its_node_is_restarted(tmp_path):
    """Flower's SuperNode sometimes keeps retrying with its old id after the SuperLink forgot it (a server restarted
    in memory): noprop-client restarts it after its patience, as it does one that exits on its own."""
    runs = tmp_path / "runs"
    fake = tmp_path / "fake_supernode.py"
    fake.write_text(
        "import pathlib, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "n = int(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text(str(n + 1))\n"
        "print('grpc: status = StatusCode.UNAUTHENTICATED, UNAUTHENTICATED:Invalid node ID', flush=True)\n"
        "if n == 0:\n"
        "    time.sleep(3600)  # stuck: retrying with the forgotten id\n"
        "sys.exit(3)  # the second one ends the client, so that the test sees the restart\n")
    code = ("import sys; from noprop.client.launcher import run_supernode; "
            f"sys.exit(run_supernode([sys.executable, {str(fake)!r}], dict(__import__('os').environ), '127.0.0.1', "
            f"{free_port()}, patience=1.0))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=quiet_env(), timeout=240)
    assert res.returncode == 3, res.stdout + res.stderr
    assert runs.read_text() == "2", "the stuck SuperNode must have been stopped and a new one started"
    out = res.stdout + res.stderr
    assert "has not ended 1s after the server forgot this node" in out and "joining again as a new node" in out, out
    assert out.count("Invalid node ID") == 2, out  # the SuperNode's output still reaches the client's


def test_dataset_specs_become_absolute_paths_for_the_flower_processes(tmp_path, monkeypatch):
    """The ServerApp and ClientApps run in other folders: every path in a dataset spec goes out absolute, a bare
    one too; names of built-in datasets (no / and no dot) stay names, even beside a folder of that name."""
    (tmp_path / "images").mkdir()
    (tmp_path / "mnist").mkdir()
    (tmp_path / "d.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_dataset_spec("npz:d.npz") == f"npz:{tmp_path / 'd.npz'}"
    assert resolve_dataset_spec("imagefolder:images") == f"imagefolder:{tmp_path / 'images'}"
    assert resolve_dataset_spec("d.npz") == str(tmp_path / "d.npz")
    assert resolve_dataset_spec("./images") == str(tmp_path / "images")
    assert resolve_dataset_spec("mnist") == "mnist" and resolve_dataset_spec("fashion-mnist") == "fashion-mnist"
    assert resolve_dataset_spec("missing.npz") == "missing.npz"  # left for the loader's "not found"


@pytest.mark.e2e
def test_a_launchers_children_end_when_it_is_killed(tmp_path):
    """PR_SET_PDEATHSIG, set by setpriv before the child's exec (no preexec_fn in a threaded launcher): a
    launcher SIGKILLed takes its ProcessGroup children and its check subprocesses' with it."""
    from noprop.ops import processes

    assert processes._SETPRIV is not None, "util-linux's setpriv is missing: install util-linux (Debian: essential)"
    code = ("import sys, time; from noprop.ops.processes import ProcessGroup; "
            "g = ProcessGroup('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'], {}); "
            "print(g.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=quiet_env())
    child = None
    try:
        child = int(parent.stdout.readline())
        def execed() -> bool:  # setpriv has set the signal and exec'd the command (same pid)
            argv = Path(f"/proc/{child}/cmdline").read_text(errors="replace").split("\0")
            return argv[0] != processes._SETPRIV and "import time; time.sleep(600)" in argv

        wait_for(execed, 60, interval=0.1, what="the child's exec of its own command")
        parent.kill()
        parent.wait(30)
        wait_for(lambda: not alive(child), 60, interval=0.1, what="the child gone with its launcher")
    finally:
        parent.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
