"""Flower's environment and commands: a quiet, local environment for Flower's processes, and its config strings.

Flower 1.39's `flower-superlink` and `flower-supernode` check for updates and send telemetry before they parse
their arguments, spawn their helpers (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by bare name from
PATH, and Ray picks the host's network address unless told otherwise: :func:`flower_env` sets all of that for
every process we start.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

from noprop.ops.cli import LaunchError

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
    found = shutil.which(name)
    if not found:
        raise LaunchError(f"{name} is not installed: install noprop-fl with its dependencies (pip install -e .)")
    return found


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
