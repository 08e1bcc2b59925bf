"""`noprop-client`: a Flower SuperNode with this device's data and limits as its node config.

It checks locally first (partition, data spec: the dataset is loaded once, so a wrong path fails here with one
line; the server's address answers and, with --root-certificate, completes a TLS handshake whose certificate that
CA trusts; the --key pair matches), then starts `flower-supernode --root-certificates CA | --insecure
[--auth-supernode-private-key KEY] --superlink HOST:PORT --host 127.0.0.1 --port P --node-config "data=...
partition-id=i num-partitions=n ..."` with telemetry and update checks off. The SuperNode runs the installed
noprop ClientApp for every message the server sends; unless --no-worker, that ClientApp relays each message to the
node's warm worker (client/worker.py), started here beside the SuperNode, so torch and the data are loaded once.
Ctrl-C / SIGTERM stop both (the SuperNode's whole process group, and the worker); otherwise the exit code is the
SuperNode's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from noprop.client.worker import start_worker, stop_worker, worker_dir
from noprop.ops.certs import check_node_key, check_root_certificate, speaks_tls, tls_handshake
from noprop.ops.cli import LaunchError, OneLineParser, examples, fail, say
from noprop.ops.flower import config_string, flower_command, flower_env
from noprop.ops.network import (
    check_port,
    format_address,
    free_port,
    is_loopback,
    parse_address,
    port_free,
    tcp_answers,
    wait_tcp,
)
from noprop.ops.processes import check_in_subprocess
from noprop.ops.run_flags import resolve_dataset_spec
from noprop.ops.supervision import supervise

PROG = "noprop-client"
DEFAULT_FLEET_PORT = 9092
DEVICES = ("auto", "cpu", "cuda", "mps")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Join a noprop-server federation: start a Flower SuperNode that trains the NoProp blocks the "
                    "server gives this device, on this device's data.",
        epilog=examples(
            "noprop-client --server 127.0.0.1:9092 --insecure --data fashion-mnist --partition 0/4",
            "noprop-client --server server.lan:9092 --root-certificate ca.crt --data fashion-mnist --partition 1/4",
            "noprop-client --server server.lan --root-certificate ca.crt --key client2 --data npz:mine.npz "
            "--partition 2/4 --name lab-pc",
            "noprop-client --superlink 127.0.0.1:9092 --root-certificates certs/ca.crt --data mnist",
        ) + "\n--superlink and --root-certificates are Flower's names for --server and --root-certificate.",
    )
    p.add_argument("--server", "--superlink", required=True, metavar="HOST:PORT",
                   help=f"the noprop-server's Fleet API address (port: default {DEFAULT_FLEET_PORT})")
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="this device's data: fashion-mnist, mnist, cifar10, cifar100, imagefolder:DIR or npz:FILE")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the datasets (default: $NOPROP_DATA or ./data)")
    p.add_argument("--partition", default="0/1", metavar="I/N",
                   help="use partition I (0-based) of N of the data (default 0/1: all of it)")
    p.add_argument("--partition-type", default=None, metavar="iid|dirichlet:ALPHA|classes:K",
                   help="how the data is split into N partitions: iid, dirichlet:ALPHA or classes:K (exactly K "
                        "classes per partition) (default: the run's partition-type)")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="this node's stable identity, which orders it in the server's plan and seeds its training, so "
                        "the same nodes and --seed give the same run (default: the --key file's name, else "
                        "partition-I-of-N); the server addresses and authenticates nodes by Flower's node id and keys, "
                        "never by this name")
    p.add_argument("--private-labels", action="store_true",
                   help="do not tell the server which classes this device holds (by default discovery reports the "
                        "set of classes holding at least a fifth of an even share of the local data, 2%% for 10 "
                        "classes, never their counts, so the plan can give each block owners with different classes)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="where training runs (default: auto, a GPU if there is one)")
    p.add_argument("--max-blocks", type=int, default=None, metavar="K",
                   help="hold at most K blocks at once (default: as many as memory allows)")
    p.add_argument("--memory-mb", type=int, default=None, metavar="N", help="memory budget in MB (default: measured)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for training (default: the run's client-threads)")
    p.add_argument("--port", type=int, default=None, metavar="PORT",
                   help="local port of the SuperNode's runtime API on 127.0.0.1 (default: a free one)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="Flower home of this node: the apps it receives are unpacked here (default: $FLWR_HOME or "
                        "~/.flwr)")
    p.add_argument("--no-worker", action="store_true",
                   help="run every message in Flower's fresh per-message process (imports torch and loads the data "
                        "each time) instead of relaying it to this node's warm worker")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the server to answer before giving up (default: 10)")
    sec = p.add_argument_group("security (one of --root-certificate and --insecure is required)")
    sec.add_argument("--root-certificate", "--root-certificates", default=None, metavar="FILE",
                     help="connect with TLS, trusting the server certificates this CA signed (noprop-certs DIR: "
                          "DIR/ca.crt)")
    sec.add_argument("--insecure", action="store_true",
                     help="connect without TLS (unencrypted; the server must run with --insecure too)")
    sec.add_argument("--key", default=None, metavar="FILE",
                     help="this node's private key, with FILE.pub beside it (noprop-certs DIR --clients N: "
                          "DIR/clients/clientI), for a server with --authorized-keys; needs --root-certificate")
    return p


def check_security(args: argparse.Namespace, host: str) -> tuple[Path | None, Path | None]:
    """(root certificate, node private key) from the flags; raises LaunchError."""
    if args.root_certificate and args.insecure:
        raise LaunchError("--root-certificate and --insecure contradict each other: pass one")
    if not args.root_certificate and not args.insecure:
        raise LaunchError("pass --root-certificate FILE for TLS (the ca.crt made by noprop-certs, the one the "
                          "server's --certificates were signed with), or --insecure for an unencrypted connection")
    if args.key and not args.root_certificate:
        raise LaunchError("--key needs --root-certificate: Flower's SuperNode authentication runs over TLS")
    if args.insecure and not is_loopback(host):
        say(PROG, f"WARNING: --insecure to {host}: the connection is not encrypted; anyone on the way can read the "
                  "model and the updates (use --root-certificate)")
    root = check_root_certificate(args.root_certificate) if args.root_certificate else None
    key = check_node_key(args.key)[0] if args.key else None
    return root, key


def check_resolves(host: str, port: int, flag: str = "--server") -> None:
    """The --server name resolves to an address (DNS or /etc/hosts); raises LaunchError."""
    try:
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise LaunchError(f"{flag} {format_address(host, port)}: the name {host} does not resolve ({reason}): "
                          "check its spelling, or give the server's IP address") from None


def parse_partition(text: str) -> tuple[int, int]:
    parts = text.strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise LaunchError(f"--partition {text!r}: use I/N, e.g. 0/4 (partition 0 of 4)") from None
    if n < 1 or not 0 <= i < n:
        raise LaunchError(f"--partition {text!r}: need N >= 1 and 0 <= I < N (partitions are numbered from 0)")
    return i, n


def node_config(args: argparse.Namespace) -> dict[str, int | str]:
    """The SuperNode's node config (keys: noprop.federation.NODE_CONFIG_KEYS) from the flags, checked as far as
    that needs no torch; :func:`check_node` does the rest. Raises LaunchError."""
    i, n = parse_partition(args.partition)
    data = resolve_dataset_spec(args.data.strip())
    if not data:
        raise LaunchError("--data is empty: name a dataset, e.g. fashion-mnist or npz:FILE")
    config: dict[str, int | str] = {"data": data, "partition-id": i, "num-partitions": n}
    if args.data_root:
        config["data-root"] = str(Path(args.data_root).expanduser().resolve())
    if args.partition_type is not None:
        config["partition-type"] = args.partition_type.strip()
    name = (args.name or "").strip() or (Path(args.key).name if args.key else "")
    if args.name is not None and not name:
        raise LaunchError("--name is empty: give this node a name, or leave --name out")
    if name:
        config["node-name"] = name
    if args.private_labels:
        config["share-labels"] = 0
    if args.device is not None:
        device = args.device.strip()
        if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise LaunchError(f"--device {device!r}: use auto, cpu, cuda, cuda:N or mps")
        config["device"] = device
    for name, value in (("max-blocks", args.max_blocks), ("memory-mb", args.memory_mb), ("threads", args.threads)):
        if value is not None:
            if value < 0:
                raise LaunchError(f"--{name} {value}: must be 0 (automatic) or more")
            config[name] = value
    return config


def check_node(config: dict) -> dict:
    """Run in a child process (noprop.ops.processes.check_in_subprocess): the device exists, the partitioning parses,
    the data loads (so a wrong name or path fails here, not inside Flower) and splits. Returns the data root
    (default resolved) and the partition's size (for iid; the whole train split's otherwise)."""
    from noprop.data import load_dataset
    from noprop.device import resolve_device
    from noprop.partition import parse_partitioning, partition
    from noprop.sources import DatasetError, default_data_root

    if "device" in config:
        try:
            resolve_device(str(config["device"]))
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
    kind = str(config.get("partition-type", "iid"))
    try:
        parse_partitioning(kind)
    except DatasetError as exc:
        raise LaunchError(f"--partition-type: {exc}") from None
    spec = str(config["data"])
    root = Path(str(config.get("data-root") or default_data_root())).expanduser().resolve()
    try:
        data = load_dataset(spec, "train", root=root)
    except DatasetError as exc:
        raise LaunchError(f"--data {spec}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"--data {spec} cannot be read: {exc}") from None
    n, i = int(config["num-partitions"]), int(config["partition-id"])
    examples = len(data)
    if n > 1:
        try:
            examples = len(partition(data.y.numpy(), n, kind, 0)[i])
        except DatasetError as exc:
            raise LaunchError(f"--partition {i}/{n}: {exc}") from None
    return {"data-root": str(root), "examples": examples}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    server_flag = "--superlink" if any(a.split("=")[0] == "--superlink" for a in given) else "--server"
    try:
        host, port = parse_address(args.server, DEFAULT_FLEET_PORT, server_flag)
        check_resolves(host, port, server_flag)  # before the data loads: a misspelt name is one line at once
        root_certificate, key = check_security(args, host)
        if not args.wait >= 0:
            raise LaunchError("--wait must be 0 or more seconds")
        config = node_config(args)
        local_port = check_port(args.port, "--port") if args.port is not None else free_port("127.0.0.1")
        if args.port is not None and not port_free("127.0.0.1", local_port):
            raise LaunchError(f"--port {local_port} on 127.0.0.1 is in use: pick another or leave --port out")
        checked = check_in_subprocess("noprop.client.launcher:check_node", config)
        config["data-root"] = checked["data-root"]
        examples = int(checked["examples"])
        server = format_address(host, port)
        reason = wait_tcp(host, port, args.wait)
        if reason is not None:
            raise LaunchError(f"no server answers at {server} ({reason}) after {args.wait:.0f}s: start noprop-server "
                              "first, or check --server")
        if root_certificate is not None:
            reason = tls_handshake(host, port, root_certificate)
            if reason is not None and "not trusted" in reason:
                raise LaunchError(f"TLS with the server at {server} failed: {reason} (--root-certificate "
                                  f"{root_certificate} must be the CA that signed the server's certificate, and that "
                                  f"certificate must name {host})")
            if reason is not None:
                raise LaunchError(f"TLS with the server at {server} failed: {reason}")
        elif speaks_tls(host, port):
            raise LaunchError(f"the server at {server} uses TLS: pass --root-certificate FILE (the ca.crt that signed "
                              "its certificate) instead of --insecure")
    except LaunchError as exc:
        return fail(PROG, str(exc))
    except KeyboardInterrupt:
        return 130

    threads = int(config.get("threads", 0)) or None
    flwr_home = Path(args.state_dir).expanduser().resolve() if args.state_dir else None
    env = flower_env(flwr_home, threads=threads)
    folder = None
    if not args.no_worker:  # started now, so that torch and the data load while the SuperNode connects
        home = flwr_home or Path(env.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()
        folder = worker_dir(home, local_port)
        config.update({"worker-dir": str(folder), "worker-owner": os.getpid()})
        start_worker(folder, config, os.getpid(), env=env)
    if root_certificate is None:
        security = ["--insecure"]
    else:
        security = ["--root-certificates", str(root_certificate)]
    if key is not None:  # Flower derives the public key from the private one (--auth-supernode-public-key is
        security += ["--auth-supernode-private-key", str(key)]  # deprecated in 1.39); check_node_key matched them
    cmd = [flower_command("flower-supernode"), *security, "--superlink", server,
           "--host", "127.0.0.1", "--port", str(local_port), "--node-config", config_string(config)]
    share = f"partition {config['partition-id']}/{config['num-partitions']}"
    if "partition-type" in config:
        share += f" ({config['partition-type']})"
    size = f"{examples} examples" if config.get("partition-type", "iid") == "iid" else "size set by the run's seed"
    mode = "no TLS" if root_certificate is None else "TLS"
    if key is not None:
        mode += f", node key {key.name}"
    say(PROG, f"joining the federation at {server} ({mode}): data {config['data']}, {share}, {size}")
    say(PROG, f"starting a Flower SuperNode (runtime API on 127.0.0.1:{local_port}); Ctrl-C stops it")
    # a connected SuperNode unregisters and exits in ~2.5 s on SIGTERM; one whose server is gone keeps retrying
    # instead, so then there is nothing to wait for
    try:
        rc = run_supernode(cmd, env, host, port)
    finally:
        if folder is not None:
            stop_worker(folder)
    if rc != 130:
        say(PROG, f"the SuperNode exited with code {rc}")
    if rc not in (0, 130) and key is not None:
        say(PROG, f"if it said \"Failed to activate SuperNode\", the server does not accept this node's key: put "
                  f"{key.name}.pub in the server's --authorized-keys folder (read when noprop-server starts)")
    return rc


FORGOTTEN = "Invalid node ID"  # the SuperLink's answer to a node id it does not know (UNAUTHENTICATED)


class ForgottenNodeWatch:
    """Tells a SuperNode stuck after the SuperLink forgot its node. Flower 1.39's SuperNode usually exits 0 then,
    but when its heartbeat thread sees the refusal first, the exit path fails ("Heartbeat sender is not running")
    and it retries with the old id forever."""

    def __init__(self, patience: float = 30.0):
        self.patience = patience
        self.forgotten_at: float | None = None

    def see(self, line: str) -> None:
        if FORGOTTEN in line and self.forgotten_at is None:
            self.forgotten_at = time.monotonic()

    def stuck(self) -> str | None:
        if self.forgotten_at is not None and time.monotonic() - self.forgotten_at > self.patience:
            return f"the SuperNode has not ended {self.patience:.0f}s after the server forgot this node"
        return None


def run_supernode(cmd: list[str], env: dict[str, str], host: str, port: int, max_restarts: int = 5,
                  patience: float = 30.0) -> int:
    """Run the SuperNode; start it again when it ends on its own with exit code 0. Flower's SuperNode does that
    when the SuperLink no longer knows its node id: a server restarted with `--superlink-db memory` forgot every
    node. Started again, it joins as a new node, and the server discovers it. One still running `patience`
    seconds after that refusal is stuck (ForgottenNodeWatch) and is restarted the same way. A failure exit (bad
    key, TLS) or more than max_restarts in 10 minutes ends the client, with the SuperNode's exit code."""
    restarts: list[float] = []
    while True:
        watch = ForgottenNodeWatch(patience)
        # a connected SuperNode unregisters and exits in ~2.5 s on SIGTERM; one whose server is gone keeps
        # retrying instead, so then there is nothing to wait for
        rc = supervise(PROG, "flower-supernode", cmd, env, "stopping the SuperNode",
                       grace=lambda: 6.0 if tcp_answers(host, port, 0.5) is None else 1.0, watch=watch.see,
                       stuck=watch.stuck)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 600.0]
        if rc != 0 or len(restarts) >= max_restarts:
            return rc
        restarts.append(now)
        say(PROG, "the SuperNode ended: the server no longer knows this node (restarted with --superlink-db "
                  "memory?); joining again as a new node")


if __name__ == "__main__":
    sys.exit(main())
