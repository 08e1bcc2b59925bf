"""`noprop-sim`: the same ServerApp and ClientApp on Flower's simulation engine (Ray), N virtual clients on one
machine. Virtual client i holds partition i of N of the run's client data (--client-data, default --dataset),
split by --partition (iid, dirichlet:ALPHA or classes:K). Ray is kept on loopback and its usage stats off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from noprop.ops.cli import LaunchError, OneLineParser, examples, fail, say
from noprop.ops.flower import apply_flower_env, flower_env
from noprop.ops.flower_app import CLIENT_APP_FACTORY, SERVER_APP_FACTORY, load_reference
from noprop.ops.run_flags import PARTITIONS, add_federation_flags, federation_config_from_args, ignored_settings
from noprop.ops.supervision import supervise

PROG = "noprop-sim"
CHILD_ENV = "NOPROP_SIM_CHILD"  # set in the child that runs the simulation
EPILOG = examples("noprop-sim --clients 8 --partition dirichlet:0.5 --rounds 5",
                  "noprop-sim --method cnn --clients 10 --partition classes:2 --rounds 4 --out runs/sim-cnn")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Simulate a NoProp federation: N virtual clients on this machine (Flower simulation engine, "
                    "Ray), the same ServerApp and ClientApp as noprop-server / noprop-client.",
        epilog=EPILOG,
    )
    sim = p.add_argument_group("simulation")
    sim.add_argument("--clients", type=int, default=4, metavar="N", help="virtual clients (default: 4)")
    sim.add_argument("--partition", default=None, metavar=PARTITIONS,
                     help="how the client data is split among the N clients: iid, dirichlet:ALPHA (label skew) or "
                          "classes:K (each client holds exactly K classes) (default: --partition-type's, iid)")
    sim.add_argument("--num-cpus", type=int, default=None, metavar="N",
                     help="CPUs Ray may use (default: all of this machine's)")
    sim.add_argument("--client-cpus", type=float, default=1.0, metavar="X",
                     help="CPUs reserved per virtual client; num-cpus / client-cpus clients train at once "
                          "(default: 1)")
    add_federation_flags(p, defaults={"min_nodes": "--clients: every virtual client is there from the start",
                                      "plan_by_speed": "off: virtual clients share this machine, so their timings "
                                                       "measure contention and would change the plan run to run"})
    return p


def backend_config(num_cpus: int, client_cpus: float) -> dict:
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.clients < 1:
            raise LaunchError(f"--clients {args.clients}: need at least 1 virtual client")
        extra: dict[str, object] = {}
        if args.partition is not None:
            extra["partition_type"] = check_partition(args.partition)
        if args.cfg_plan_by_speed is None:  # virtual clients share this machine: their speed is not theirs
            extra["plan_by_speed"] = False
        if args.cfg_min_nodes is None:
            extra["min_nodes"] = args.clients  # every virtual client is there from the start
        cfg, overrides = federation_config_from_args(args, extra)
        if cfg.min_nodes > args.clients:
            raise LaunchError(f"--min-clients {cfg.min_nodes} is more than --clients {args.clients}")
        num_cpus = args.num_cpus if args.num_cpus is not None else (os.cpu_count() or 1)
        if num_cpus < 1 or not args.client_cpus > 0:
            raise LaunchError("--num-cpus must be at least 1 and --client-cpus positive")
    except LaunchError as exc:
        return fail(PROG, str(exc))

    if os.environ.get(CHILD_ENV) != "1":
        for warning in ignored_settings(cfg, {k: v for k, v in overrides.items() if k not in extra}):
            say(PROG, warning)
        return run_in_child(list(sys.argv[1:] if argv is None else argv))
    return simulate(cfg, args, num_cpus)


def run_in_child(argv: list[str]) -> int:
    """Run the simulation in a child process in a session of its own (Ray's processes join it), so that Ctrl-C
    and SIGTERM, which Ray and Flower do not honour mid-run, stop all of it. The exit code is the child's."""
    env = flower_env()
    env[CHILD_ENV] = "1"
    return supervise(PROG, "noprop-sim", [sys.executable, "-m", "noprop.ops.sim", *argv], env,
                     "stopping the simulation and Ray", grace=lambda: 10.0)


def check_partition(text: str) -> str:
    """--partition's value, checked here so that the message names --partition (the run setting it sets is
    partition-type). Raises LaunchError."""
    from noprop.partition import parse_partitioning
    from noprop.sources import DatasetError

    spec = text.strip()
    try:
        parse_partitioning(spec)
    except DatasetError as exc:
        raise LaunchError(f"--partition {text}: {exc}") from None
    return spec


def check_data(cfg) -> None:
    """The server's test split of --dataset and the clients' train split of --client-data (default --dataset) load,
    before Ray starts: a wrong name or path is one line naming the flag, not a failure inside the simulation.
    Raises LaunchError."""
    from noprop.data import load_dataset
    from noprop.sources import DatasetError

    checks = [("--dataset", cfg.dataset, "test")]
    checks.append(("--client-data", cfg.client_data, "train") if cfg.client_data else ("--dataset", cfg.dataset,
                                                                                          "train"))
    for flag, spec, split in checks:
        try:
            load_dataset(spec, split, root=cfg.data_root or None)
        except DatasetError as exc:
            raise LaunchError(f"{flag} {spec}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise LaunchError(f"{flag} {spec} cannot be read: {exc}") from None


def check_class_partitions(cfg, clients: int) -> None:
    """classes:K can only be checked against the data (K at most its number of classes, clients x K at least
    it): check it once here, rather than let every virtual client fail its first round. Raises LaunchError."""
    from noprop.data import load_dataset
    from noprop.partition import parse_partitioning, partition
    from noprop.sources import DatasetError

    if clients < 2 or parse_partitioning(cfg.partition_type)[0] != "classes":
        return
    spec = cfg.client_data or cfg.dataset
    try:
        labels = load_dataset(spec, "train", root=cfg.data_root or None).y.numpy()
        partition(labels, clients, cfg.partition_type, cfg.seed)
    except DatasetError as exc:
        raise LaunchError(f"--partition {cfg.partition_type} of {spec} over {clients} clients: {exc}") from None


def simulate(cfg, args: argparse.Namespace, num_cpus: int) -> int:
    try:
        check_data(cfg)
        check_class_partitions(cfg, args.clients)
    except LaunchError as exc:
        return fail(PROG, str(exc))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    apply_flower_env(out / ".flower" / "flwr-home")  # before flwr/ray are imported
    done_path = out / "DONE.json"
    done_path.unlink(missing_ok=True)

    from flwr.simulation import run_simulation

    # the apps by reference, as the deployment's pyproject names them: ops imports no noprop.server / noprop.client
    make_server_app = load_reference(SERVER_APP_FACTORY)
    make_client_app = load_reference(CLIENT_APP_FACTORY)

    overrides = cfg.to_run_config()
    shape = cfg.round_shape()
    say(PROG, f"{args.clients} virtual clients ({cfg.partition_type} partitions of {cfg.client_data or cfg.dataset}), "
              f"{cfg.num_rounds} rounds, {shape}; Ray with {num_cpus} CPUs, "
              f"{args.client_cpus:g} per client; output in {out}")
    start = time.monotonic()
    try:
        run_simulation(server_app=make_server_app(overrides), client_app=make_client_app(overrides),
                       num_supernodes=args.clients, backend_config=backend_config(num_cpus, args.client_cpus))
    except KeyboardInterrupt:
        say(PROG, "interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - Flower re-raises the ServerApp's exception; report it on one line
        return fail(PROG, f"the simulation failed: {type(exc).__name__}: {exc}", 1)
    finally:
        _shutdown_ray()
    try:
        done = json.loads(done_path.read_text())
    except (OSError, json.JSONDecodeError):
        return fail(PROG, f"the simulation ended after {time.monotonic() - start:.0f}s without writing {done_path}: "
                          "see the log above", 1)
    acc = done.get("accuracy")
    acc_text = f"{100 * acc:.2f}%" if isinstance(acc, int | float) else "?"
    plots = ", ".join(str(out / name) for name in ("accuracy.png", "ownership.png") if (out / name).exists())
    say(PROG, f"done in {time.monotonic() - start:.0f}s: final accuracy {acc_text}; checkpoint "
              f"{out / 'checkpoint.pt'}, metrics {out / 'metrics.jsonl'}, plots {plots or 'none'}")
    return 0


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort; Ray may not be importable or already down
        pass


if __name__ == "__main__":
    sys.exit(main())
