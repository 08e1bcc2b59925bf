"""What the launchers share: a quiet, local environment for Flower's processes, run flags generated from
FederationConfig, address and port helpers, and process groups that are always cleaned up.

Used by `noprop-server`, `noprop-client` and `noprop-sim`. Flower 1.39's `flower-superlink` and
`flower-supernode` check for updates and send telemetry before they parse their arguments, spawn their helpers
(`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by bare name from PATH, and Ray picks the host's
network address unless told otherwise: :func:`flower_env` sets all of that for every process we start.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import errno
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing noprop.federation imports torch (~300 MB): the client launcher never needs it
    from noprop.federation import FederationConfig


def _federation_config() -> type[FederationConfig]:
    from noprop.federation import FederationConfig

    return FederationConfig

# ----------------------------------------------------------------------------------------------------------
# Errors and messages


class LaunchError(Exception):
    """A problem the user can fix; the message is one line saying what and how."""


def fail(prog: str, message: str, code: int = 2) -> int:
    """Print ``prog: error: message`` (one line) to stderr and return ``code``."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return code


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: ...``, exit 2) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --round must not silently mean --round-timeout
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise SystemExit(fail(self.prog, f"{message} (see {self.prog} --help)"))


def say(prog: str, message: str) -> None:
    print(f"[{prog}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Environment

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # flwr sends telemetry unless this is 0 (checked before argparse)
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # and asks api.flower.ai for updates unless this is 1
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never `uv sync` a run's dependencies
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node IP becomes 127.0.0.1: every Ray server on loopback
    "PYTHONUNBUFFERED": "1",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SUPEREXEC_POLL_S = "0.2"  # Flower's default is 1.0


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (flwr, flower-superlink, noprop-*)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: str | os.PathLike | None = None, threads: int | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment for a Flower process: telemetry and update checks off, Ray on loopback,
    this venv's bin first on PATH, FLWR_HOME if given, loopback never sent through a proxy."""
    env = dict(os.environ if base is None else base)
    env.update(QUIET_ENV)
    path = env.get("PATH", "")
    env["PATH"] = os.pathsep.join([str(venv_bin()), *[p for p in path.split(os.pathsep) if p]])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    no_proxy = [p for p in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if p]
    for name in LOOPBACK_NAMES:
        if name not in no_proxy:
            no_proxy.append(name)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    # a SuperExec looks for new work every second by default: a fifth of that takes ~0.4 s off every message
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    return env


def apply_flower_env(flwr_home: str | os.PathLike | None = None) -> None:
    """The same settings for this process (simulation runs Flower and Ray in-process)."""
    env = flower_env(flwr_home)
    for key in (*QUIET_ENV, "PATH", "NO_PROXY", "no_proxy", "FLWR_HOME"):
        if key in env:
            os.environ[key] = env[key]


def flower_command(name: str) -> str:
    """Full path of a Flower console script from this venv (falls back to PATH)."""
    candidate = venv_bin() / name
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which(name)
    if not found:
        raise LaunchError(f"{name} is not installed: install noprop-fl with its dependencies (pip install -e .)")
    return found


# ----------------------------------------------------------------------------------------------------------
# Addresses and ports


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, default_port: int, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (default port) or ``[V6]:PORT`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise LaunchError(f"{what} is empty: give HOST:PORT, e.g. 127.0.0.1:{default_port}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise LaunchError(f"{what} {text!r} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise LaunchError(f"{what} {text!r} has no host: give HOST:PORT, e.g. 127.0.0.1:{default_port}")
    port = default_port
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise LaunchError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    check_port(port, what)
    return host, port


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise LaunchError(f"{what}: port {port} is out of range 1..65535")
    return port


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET


def port_free(host: str, port: int) -> bool:
    """Whether we could listen on host:port now (0.0.0.0 and :: test the wildcard). SO_REUSEADDR as the
    servers use it: connections of a previous server in TIME_WAIT do not count, a listening socket does."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except socket.gaierror:
            raise LaunchError(f"cannot resolve host {host!r}: give an IP address or a known host name") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LaunchError(f"{host} is not an address of this machine: give one of its addresses, "
                                  "127.0.0.1 or 0.0.0.0") from None
            return False
    return True


def port_free_soon(host: str, port: int, wait: float = 8.0) -> bool:
    """port_free, allowing a server that is still shutting down (a killed noprop-server's SuperLink exits a few
    seconds after its launcher) up to ``wait`` s to let go of the port."""
    deadline = time.monotonic() + wait
    while not port_free(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (the usual small race applies)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def tcp_answers(host: str, port: int, timeout: float = 1.0) -> str | None:
    """None if something accepts a TCP connection at host:port, else the reason it does not."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def wait_tcp(host: str, port: int, timeout: float, interval: float = 0.5) -> str | None:
    """Try for up to ``timeout`` s; None once it answers, else the last reason."""
    deadline = time.monotonic() + timeout
    while True:
        reason = tcp_answers(host, port, timeout=min(2.0, max(timeout, 0.1)))
        if reason is None or time.monotonic() >= deadline:
            return reason
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------------
# Values in Flower's `key=value` config strings (node config; run config)


def config_value(value: bool | int | float | str) -> str:
    """One value as Flower's `--node-config` parser reads it: a TOML value that its regex keeps whole
    (``(\\S+?)=('[^']*'|"[^"]*"|\\S+)``): ints and floats bare, strings in double quotes, or in single quotes
    (a TOML literal string) when they hold a backslash or a double quote."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise LaunchError(f"config value {value!r} is not a finite number")
        return repr(value)
    text = str(value)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise LaunchError(f"config value {text!r} holds a control character: rename it")
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    raise LaunchError(f"config value {text!r} holds both quote kinds, which Flower's config parser cannot carry")


def config_string(values: dict[str, bool | int | float | str]) -> str:
    return " ".join(f"{key}={config_value(value)}" for key, value in values.items())


# ----------------------------------------------------------------------------------------------------------
# Run flags generated from FederationConfig

# friendly names kept next to the generated ones (--rounds is --num-rounds, --min-clients is --min-nodes)
FLAG_ALIASES = {"num_rounds": ("--rounds",), "min_nodes": ("--min-clients",)}
FLAG_HELP = {
    "method": "dt (each client trains the NoProp blocks it owns) or a one-network method trained whole by every "
              "client and averaged (FedAvg): ct, fm, adjoint, backprop, cnn (the plain CNN peer)",
    "num_rounds": "federated rounds",
    "T": "number of NoProp blocks (diffusion steps)",
    "policy": "block ownership policy: rotate (a block moves to another owner each round) or replicate",
    "replicas": "owners per block under the replicate policy",
    "min_nodes": "clients that must connect before the first round",
    "local_epochs": "passes over its local data a client makes per round",
    "batch_size": "training batch size on the clients",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "embedding": "class embedding: one-hot or learned:D",
    "head": "output head: softmax or radial",
    "eta": "weight of the denoising loss (the spec's eta; 0 = the method's default: dt 0.1, ct 1.0)",
    "steps": "ct, fm, adjoint: integration steps from t=0 to 1 at inference (0 = the method's default)",
    "solver": "fm: euler or heun; adjoint: euler, midpoint or rk4 (empty = euler)",
    "fm_sigma": "fm: width of the Gaussian probability path",
    "clip": "the schedule's alpha-bar clip",
    "channels": "conv widths of a block, three comma-separated numbers",
    "hidden": "hidden width of a block",
    "dropout": "dropout in a block",
    "norm": "dt: normalisation in a block: batch (Figure 6) or layer (no running statistics to skew)",
    "z_skip": "dt: each block adds the closed-form class posterior given z_{t-1} to its logits and learns only what "
              "x adds (not Figure 6; --no-z-skip is the paper's block)",
    "head_steps": "dt: steps the server trains the output head each round, class-balanced on q(z_T | y), "
                  "no images (0 = off: the averaged head of the clients)",
    "logit_adjust": "dt: clients add their local label prior to the logits while training (balanced softmax), so a "
                    "block does not learn its last owner's label mix",
    "split_local_data": "dt: each of a client's k blocks trains on its own 1/k of the local data, so a round costs "
                        "one block-epoch whatever k is (with replicate: more owners per block at the same compute)",
    "min_local_steps": "a client raises its local epochs until its local data gives at least this many optimizer "
                       "steps a round, per block it trains (with --split-local-data: over its blocks' shares "
                       "together); the same floor applies to FedAvg clients (0 = off)",
    "dataset": "dataset the server evaluates on (its test split): fashion-mnist, mnist, cifar10, cifar100, "
               "imagefolder:DIR, npz:FILE",
    "data_root": "folder holding the datasets (default: $NOPROP_DATA or ./data)",
    "client_data": "dataset of clients that name none (default: --dataset)",
    "partition_type": "default partitioning of clients that name none: iid, dirichlet:ALPHA or classes:K (K classes "
                      "per client)",
    "eval_limit": "test examples evaluated each round (0 = all)",
    "final_eval_limit": "test examples evaluated after the last round (0 = all)",
    "eval_mode": "inference mode for evaluation: deterministic or stochastic",
    "eval_in_background": "dt: evaluate and checkpoint round r while round r+1 trains, off the rounds' critical path "
                          "(a crash then can lose round r too: --resume continues from the checkpoint before it)",
    "client_eval": "also ask clients that can hold the chain to evaluate it on their data",
    "out": "output folder: metrics.jsonl, checkpoint.pt, accuracy.png, ownership.png, DONE.json",
    "resume": "continue from OUT/checkpoint.pt",
    "seed": "random seed",
    "round_timeout": "seconds a round waits for replies; later replies are dropped and the node planned out",
    "join_timeout": "seconds the first round waits for --min-clients clients",
    "reply_poll_s": "seconds between the server's looks for replies (Flower's own Grid waits 3)",
    "client_threads": "torch threads per client process (0 = torch's default)",
    "aggregation": "how the shared embedding and head are combined: mean (weighted by examples), or median / "
                   "trimmed-mean (coordinate-wise, robust to a few poisoned nodes; need 3+ replies to differ)",
    "trim_fraction": "trimmed-mean: share of the replies cut at each end of every coordinate",
    "max_value_ratio": "reject a reply holding a value above this many times the largest magnitude of the same "
                       "global tensor (at least 1)",
}
PATH_FIELDS = ("out", "data_root")  # resolved to absolute paths: Flower's processes run elsewhere
DATASET_FIELDS = ("dataset", "client_data")  # npz:FILE / imagefolder:DIR specs get an absolute path


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_default(f) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"FederationConfig.{f.name} has no default")


def _kind(default: object) -> type:
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return kind
    raise TypeError(f"FederationConfig default {default!r} is not bool, int, float or str")


def _int_flag(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float_flag(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_federation_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> dict[str, str]:
    """One flag per FederationConfig field (kebab-case; booleans get --x/--no-x), plus the friendly aliases
    and ``--config TOML``. Every flag defaults to None so that only what the user gave overrides.
    Returns {field name: primary flag}."""
    group = parser.add_argument_group("run settings (defaults from noprop.federation.FederationConfig)")
    group.add_argument("--config", metavar="TOML", default=None,
                       help="TOML file of run settings (keys = these flags' names, dashes or underscores); "
                            "flags win over it")
    flags = {}
    for f in fields(_federation_config()):
        if f.name in skip:
            continue
        default = field_default(f)
        kind = _kind(default)
        names = [flag_name(f.name), *FLAG_ALIASES.get(f.name, ())]
        help_text = f"{FLAG_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default!r})"
        dest = f"cfg_{f.name}"
        if kind is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            converter = {int: _int_flag, float: _float_flag, str: str}[kind]
            metavar = f.name.upper().replace("_", "-") if f.name != "T" else "T"
            group.add_argument(*names, dest=dest, type=converter, default=None, metavar=metavar, help=help_text)
        flags[f.name] = names[0]
    return flags


def load_config_toml(path: str | os.PathLike) -> dict[str, object]:
    """Run settings from a TOML file: FederationConfig field names (dashes or underscores), at the top level
    or in a [federation] table; unknown keys and wrong types are errors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise LaunchError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise LaunchError(f"config file {path} is not valid TOML: {exc}") from None
    if isinstance(raw.get("federation"), dict):
        raw = raw["federation"]
    known = {f.name: field_default(f) for f in fields(_federation_config())}
    aliases = {alias.lstrip("-").replace("-", "_"): name for name, names in FLAG_ALIASES.items() for alias in names}
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name not in known:
            raise LaunchError(f"config file {path}: unknown key {key!r}; known keys: "
                              f"{', '.join(n.replace('_', '-') for n in known)}")
        values[name] = coerce(name, value, known[name], f"config file {path}: key {key!r}")
    return values


def coerce(name: str, value: object, default: object, where: str) -> object:
    kind = _kind(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise LaunchError(f"{where} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise LaunchError(f"{where} must be a whole number, not {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise LaunchError(f"{where} must be a number, not {value!r}")
    if isinstance(value, str):
        return value
    if name == "channels" and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return ",".join(str(v) for v in value)
    raise LaunchError(f"{where} must be a string, not {value!r}")


def resolve_dataset_spec(spec: str, base: Path | None = None) -> str:
    """``npz:rel/file.npz`` -> ``npz:/abs/rel/file.npz`` (same for imagefolder:), and a bare path that exists
    (``rel/mine.npz``, ``./images``: one with a / or a dot, which no built-in dataset name has) -> its absolute
    path, so that the Flower processes, which run elsewhere, find it; other specs unchanged."""

    def absolute(text: str) -> str:  # joining an absolute path keeps it as it is
        return str(((base or Path.cwd()) / Path(text).expanduser()).resolve())

    for prefix in ("npz:", "imagefolder:"):
        if spec.startswith(prefix) and spec[len(prefix):].strip():
            return prefix + absolute(spec[len(prefix):].strip())
    bare = spec.strip()
    if ("/" in bare or "." in bare) and Path(bare).expanduser().exists():
        return absolute(bare)
    return spec


def federation_config_from_args(args: argparse.Namespace, extra: dict[str, object] | None = None,
                                resolve_paths: bool = True) -> tuple[FederationConfig, dict[str, object]]:
    """Defaults < --config TOML < ``extra`` < flags. Returns the validated config and the overridden fields.
    Relative paths (out, data root, npz:/imagefolder: specs) become absolute. Raises LaunchError."""
    FederationConfig = _federation_config()  # noqa: N806 - the class
    values: dict[str, object] = {}
    if getattr(args, "config", None):
        values.update(load_config_toml(args.config))
    values.update(extra or {})
    for f in fields(FederationConfig):
        given = getattr(args, f"cfg_{f.name}", None)
        if given is not None:
            values[f.name] = given
    if resolve_paths:
        for name in PATH_FIELDS:
            if values.get(name):
                values[name] = str(Path(str(values[name])).expanduser().resolve())
        if not values.get("out"):
            values["out"] = str(Path(FederationConfig.out).resolve())
        for name in DATASET_FIELDS:
            if values.get(name):
                values[name] = resolve_dataset_spec(str(values[name]))
    try:
        cfg = FederationConfig(**values).validate()
    except (ValueError, TypeError) as exc:
        raise LaunchError(str(exc)) from None
    check_partitioning(cfg.partition_type, "partition-type")
    return cfg, values


# ----------------------------------------------------------------------------------------------------------
# Checks that need torch or the data run in a short-lived child, so that a launcher that lives as long as its
# Flower process does not keep torch and a dataset in memory (a client launcher stays at a few tens of MB).


def check_in_subprocess(target: str, payload: dict, timeout: float = 1800.0) -> dict:
    """Run ``target`` ("module:function", taking and returning a JSON-able dict) in a fresh interpreter.
    A LaunchError there becomes a LaunchError here (its one line); anything else, a LaunchError saying so."""
    code = "import sys\nfrom noprop.launch import _run_check\nsys.exit(_run_check(sys.argv[1], sys.argv[2]))"
    cmd, preexec = dying_with_us([sys.executable, "-c", code, target, json.dumps(payload)])
    proc = subprocess.Popen(cmd, env=flower_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # Ctrl-C or timeout: the child goes too
        proc.kill()
        proc.communicate()
        raise
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if proc.returncode == 0:
        return json.loads(out.strip().splitlines()[-1])
    if proc.returncode == 2 and lines:
        raise LaunchError(lines[-1])
    raise LaunchError(f"checking {target} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


def _run_check(target: str, payload: str) -> int:
    import importlib

    module, _, name = target.partition(":")
    func = getattr(importlib.import_module(module), name)
    try:
        result = func(json.loads(payload))
    except LaunchError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def check_partitioning(spec: str, what: str) -> None:
    from noprop.partition import parse_partitioning
    from noprop.sources import DatasetError

    try:
        parse_partitioning(spec)
    except DatasetError as exc:
        raise LaunchError(f"{what}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Processes: own process group each, always stopped (leader first, then whatever is left in the group)

_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover
    _LIBC = None


def _child_setup() -> None:
    # runs in the child after fork: if the launcher dies (even by SIGKILL), the child gets SIGTERM
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_SETPRIV = shutil.which("setpriv")  # util-linux, essential on Debian


def dying_with_us(cmd: Sequence[str]) -> tuple[list[str], Callable[[], None] | None]:
    """(command, preexec_fn) for a child that gets SIGTERM when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG). With util-linux's setpriv the child sets it itself before it execs the command, so no
    Python runs between fork and exec (a preexec_fn can deadlock there when the parent has threads, as the
    launchers do); without setpriv, prctl in a preexec_fn."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd], None
    return list(cmd), _child_setup if _LIBC is not None else None


def _forward_lines(pipe, watch: Callable[[str], None]) -> None:
    """Copy a child's output to ours line by line, showing each line to watch."""
    for raw in iter(pipe.readline, b""):
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        watch(raw.decode(errors="replace"))
    pipe.close()


class ProcessGroup:
    """A child started in its own session (so Ctrl-C in the terminal reaches only the launcher), stopped as a
    group. All live ones are stopped at interpreter exit."""

    live: list[ProcessGroup] = []

    def __init__(self, name: str, cmd: Sequence[str], env: dict[str, str], log_path: Path | None = None,
                 cwd: str | os.PathLike | None = None, watch: Callable[[str], None] | None = None):
        """log_path: the child's output goes there; else to ours, and with watch, through a pipe whose every line
        is also handed to watch (on a reader thread)."""
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed in stop()
        out = self._log if self._log is not None else (subprocess.PIPE if watch is not None else None)
        argv, preexec = dying_with_us(self.cmd)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT if out is not None else None,
                                     start_new_session=True, preexec_fn=preexec)
        self.pid = self.proc.pid
        if out is subprocess.PIPE:
            threading.Thread(target=_forward_lines, args=(self.proc.stdout, watch), daemon=True).start()
        ProcessGroup.live.append(self)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - a member we cannot signal
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the leader and up to ``grace`` s for it to exit (Flower's processes shut down cleanly on
        SIGTERM), then SIGTERM and SIGKILL to whatever is left of the group. Idempotent."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(grace)
            if self._group_alive():
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + 3.0
                while self._group_alive() and time.monotonic() < deadline:
                    if self.proc.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(0.1)
                    else:
                        time.sleep(0.1)
                if self._group_alive():
                    self._signal_group(signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self in ProcessGroup.live:
                ProcessGroup.live.remove(self)
        return self.proc.returncode


def stop_all(grace: float = 10.0) -> None:
    for group in reversed(list(ProcessGroup.live)):
        group.stop(grace)


atexit.register(stop_all, 5.0)


def run_quiet(cmd: Sequence[str], env: dict[str, str], timeout: float, cwd: str | os.PathLike | None = None
              ) -> subprocess.CompletedProcess:
    """A short-lived command (the flwr CLI), its own session, killed with its group on timeout."""
    argv, preexec = dying_with_us(cmd)
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


# ----------------------------------------------------------------------------------------------------------
# Signals: SIGTERM and SIGHUP behave like Ctrl-C (KeyboardInterrupt), so one `except` path stops everything


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []


def install_signal_handlers() -> None:
    def handler(signum, _frame):
        _received.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def raise_if_interrupted() -> None:
    """Re-raise a signal whose exception was swallowed: one that lands in a finalizer or an at-fork hook (seen:
    logging's _releaseLock while a subprocess was spawned) is printed as "Exception ignored" and lost, so every
    waiting loop calls this."""
    if _received:
        raise Interrupted(_received[-1])


def shield_signals() -> None:
    """While cleaning up: further Ctrl-C / SIGTERM are ignored so that the cleanup itself completes (it is
    bounded by the grace periods)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def supervise(prog: str, name: str, cmd: Sequence[str], env: dict[str, str], stopping: str,
              grace: Callable[[], float], watch: Callable[[str], None] | None = None,
              stuck: Callable[[], str | None] | None = None) -> int:
    """Run one child process group until it exits (its exit code, signals as 128 + n) or until Ctrl-C / SIGTERM
    (130); either way the group is stopped, with grace() seconds for it to exit on its own. watch sees each line
    of the child's output; when stuck() gives a reason, the child is stopped and 0 returned, as if it had ended
    on its own."""
    install_signal_handlers()
    child: ProcessGroup | None = None
    try:
        child = ProcessGroup(name, list(cmd), env, watch=watch)
        while True:
            try:
                rc = child.wait(None if stuck is None else 1.0)
                break
            except subprocess.TimeoutExpired:
                why = stuck()
                if why:
                    say(prog, f"{why}: stopping it")
                    child.stop(grace())
                    return 0
        return rc if rc >= 0 else 128 - rc
    except KeyboardInterrupt as exc:
        shield_signals()
        why = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"
        say(prog, f"{why}: {stopping}")
        return 130
    finally:
        shield_signals()
        if child is not None:
            child.stop(grace())


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
