"""The server launcher's checks before any process starts: settings, ports, TLS files and node keys, the
evaluation data and --resume's checkpoint, gathered into the Plan that the Server then carries out."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from noprop.federation import FederationConfig
from noprop.ops.certs import authorized_keys, certificate_names, check_server_certificates, load_certificate
from noprop.ops.cli import LaunchError, say
from noprop.ops.network import check_port, format_address, is_loopback, port_free_soon
from noprop.ops.processes import check_in_subprocess
from noprop.ops.run_flags import federation_config_from_args, ignored_settings

PROG = "noprop-server"


@dataclass
class Plan:
    cfg: FederationConfig
    overrides: dict
    host: str
    port: int
    control_port: int
    state: Path
    verbose: bool
    startup_timeout: float
    superlink_db: str = "file"  # file | memory
    tls: dict[str, Path] | None = None  # ca, cert, key (check_server_certificates); None = --insecure
    node_keys: tuple[Path, ...] = ()  # --authorized-keys: the *.pub files to register

    @property
    def fleet_address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def control_address(self) -> str:
        return format_address("127.0.0.1", self.control_port)

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.state / "app"

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def prepare(args: argparse.Namespace) -> Plan:
    """Everything that can be checked before a process starts; raises LaunchError."""
    cfg, overrides = federation_config_from_args(args)
    for warning in ignored_settings(cfg, overrides):
        say(PROG, warning)
    host = args.host.strip().strip("[]")
    if not host:
        raise LaunchError("--host is empty: give an address, e.g. 127.0.0.1 or 0.0.0.0")
    check_port(args.port, "--port")
    check_port(args.control_port, "--control-port")
    if args.port == args.control_port:
        raise LaunchError(f"--port and --control-port are both {args.port}: use two different ports")
    tls, node_keys = check_security(args, host)
    if not args.startup_timeout > 0:
        raise LaunchError("--startup-timeout must be positive")
    for what, h, port in (("--port", host, args.port), ("--control-port", "127.0.0.1", args.control_port)):
        if not port_free_soon(h, port):
            raise LaunchError(f"{what} {port} on {h} is in use (another noprop-server or SuperLink?): pass a free "
                              f"{what}")
    check_dataset(cfg)
    if cfg.resume:
        note = check_in_subprocess("noprop.ops.preflight:check_resume",
                                   {"out": cfg.out, "run-config": cfg.to_run_config()})["note"]
        if note:
            say(PROG, f"WARNING: {note}")
    if cfg.resume and args.superlink_db == "memory":
        say(PROG, "--superlink-db memory: the SuperLink has forgotten the clients of the last run; each "
                  "noprop-client rejoins as a new node")
    state = Path(args.state_dir).expanduser().resolve() if args.state_dir else Path(cfg.out) / ".flower"
    return Plan(cfg=cfg, overrides=overrides, host=host, port=args.port, control_port=args.control_port,
                state=state, verbose=args.verbose, startup_timeout=args.startup_timeout,
                superlink_db=args.superlink_db, tls=tls, node_keys=tuple(node_keys))


def check_security(args: argparse.Namespace, host: str) -> tuple[dict[str, Path] | None, list[Path]]:
    """TLS files and node keys from --certificates / --insecure / --authorized-keys; raises LaunchError."""
    if args.certificates and args.insecure:
        raise LaunchError("--certificates and --insecure contradict each other: pass one")
    if not args.certificates and not args.insecure:
        raise LaunchError("pass --certificates DIR for TLS (make DIR with: noprop-certs DIR --host NAME), or "
                          "--insecure for unencrypted connections")
    if args.authorized_keys and not args.certificates:
        raise LaunchError("--authorized-keys needs --certificates: Flower's SuperNode authentication runs over TLS")
    if not args.certificates:
        if not is_loopback(host):
            say(PROG, f"WARNING: --insecure on --host {host}: the Fleet API is reachable beyond this machine without "
                      "TLS; traffic is not encrypted and anyone who reaches it can join the federation and see the "
                      "model (use --certificates DIR from noprop-certs)")
        return None, []
    tls = check_server_certificates(args.certificates)
    names = certificate_names(load_certificate(tls["cert"], "--certificates"))
    if host not in ("0.0.0.0", "::") and host not in names:
        say(PROG, f"WARNING: --host {host} is not among the names in {tls['cert']} ({', '.join(names)}): clients "
                  f"that connect to {host} will refuse it; make one with noprop-certs DIR --host {host}")
    return tls, authorized_keys(args.authorized_keys) if args.authorized_keys else []


def check_dataset(cfg: FederationConfig) -> int:
    """The server evaluates on the dataset's test split: load it now (in a child process, so that this long-lived
    process does not keep torch and the data in memory) so that a wrong name or path fails here. Returns the
    split's size."""
    payload = {"dataset": cfg.dataset, "data-root": cfg.data_root}
    return int(check_in_subprocess("noprop.ops.preflight:check_eval_data", payload)["examples"])


def check_eval_data(payload: dict) -> dict:
    """In a child: the evaluation dataset's test split loads (torch)."""
    from noprop.data import load_dataset
    from noprop.sources import DatasetError

    spec = str(payload["dataset"])
    try:
        data = load_dataset(spec, "test", root=str(payload["data-root"]) or None)
    except DatasetError as exc:
        raise LaunchError(f"--dataset {spec}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"--dataset {spec} cannot be read: {exc}") from None
    return {"examples": len(data)}


def check_resume(payload: dict) -> dict:
    """--resume: OUT's checkpoint (or the previous one, if the latest is torn or corrupt) must load and hold the
    model this run builds (method, and the config from the settings and the data's shape and classes), so that a
    run that cannot resume fails here with one line rather than inside the ServerApp."""
    from noprop.checkpoint import CheckpointError, load_latest_checkpoint, previous_path, resume_mismatch
    from noprop.data import load_dataset
    from noprop.federation import FederationConfig

    path = Path(str(payload["out"])) / "checkpoint.pt"
    if not path.exists() and not previous_path(path).exists():
        return {"note": ""}  # nothing to resume: the run starts at round 1 (the ServerApp says so)
    try:
        ckpt, used, note = load_latest_checkpoint(path)
    except CheckpointError as exc:
        raise LaunchError(f"--resume: {exc}") from None
    cfg = FederationConfig.from_run_config(payload["run-config"])
    data = load_dataset(cfg.dataset, "test", root=cfg.data_root or None)  # check_dataset has loaded it once
    problem = resume_mismatch(ckpt, cfg.method, cfg.model_config(data.input_shape, data.num_classes))
    if problem:
        raise LaunchError(f"--resume: {used} {problem}")
    return {"note": note or ""}
