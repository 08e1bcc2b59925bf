"""Load on the federation server (issue 6, item 7): 50 simulated clients for 3 rounds.

    .venv/bin/python bench/load_server.py --data-root /work/main/data        # the run
    .venv/bin/python bench/load_server.py --report                            # markdown from the JSON

`noprop-sim --clients 50` runs the real noprop ServerApp and ClientApp on Flower's simulation engine (Ray, 2
CPUs, 1 CPU and 1 torch thread per virtual client): each client holds an IID 1/50 share of a class-stratified
Fashion-MNIST training subset (--subset, default 5000: 100 images per client); the server evaluates on the first
--eval-images test images after every round. T = 10 blocks with small conv widths (8,16,16), hidden 64, batch 32,
5 local epochs per round at lr 3e-3 (so that 3 rounds of 100 images per client learn something).

Measured: the server side's memory (the simulation's driver process, which runs the ServerApp: its VmRSS every
0.5 s and its VmHWM) and the whole process tree's (noprop-sim, the driver, Ray's raylet, GCS and workers: the
sum of RSS, which counts shared libraries once per process, and the sum of PSS, which shares them out), the wall
time of every round (round_time_s of metrics.jsonl), the time to the first round (Ray start-up and capacity
discovery of 50 nodes), per-round accuracy. Results: --json (default bench/results/load/server.json), with
`uptime` before and after; the markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_common import MemorySampler, descendants, machine, process_name, run_or_report, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("NOPROP_DATA", str(ROOT / "data")))
    p.add_argument("--work", default=str(ROOT / "runs" / "load-server"), help="data and the run's output")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--channels", default="8,16,16")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--local-epochs", type=int, default=5, help="passes over its 100 images a client makes per round")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--subset", type=int, default=5000, help="training images shared out among the clients")
    p.add_argument("--eval-images", type=int, default=2000, help="test images the server evaluates on")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "load" / "server.json"))
    p.add_argument("--report", action="store_true", help="only print the markdown of --json")
    return p


def prepare_data(args: argparse.Namespace) -> Path:
    """The subset and the first test images as one .npz of raw uint8 pixels (what npz: datasets read)."""
    from noprop.data import load_train_test

    path = Path(args.work) / f"fashion-mnist-{args.subset}-{args.eval_images}.npz"
    if path.exists():
        return path
    train, test = load_train_test("fashion-mnist", root=args.data_root, subset=args.subset, seed=0)

    def raw(d) -> np.ndarray:  # undo the normalisation: back to the uint8 pixels
        m, s = float(d.mean[0]), float(d.std[0])
        return np.rint((d.x.numpy() * s + m) * 255).clip(0, 255).astype(np.uint8)

    n = min(args.eval_images, len(test))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=raw(train), y_train=train.y.numpy(), x_test=raw(test)[:n], y_test=test.y.numpy()[:n],
             classes=np.array(list(train.classes)))
    return path


def find_driver(launcher: int) -> int | None:
    """The process that runs the simulation (and in it the ServerApp): the launcher's `-m noprop.ops.sim`."""
    for pid in sorted(descendants(launcher)):
        if "noprop.ops.sim" in process_name(pid):
            return pid
    return None


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def run(args: argparse.Namespace) -> dict:
    before = uptime()
    npz = prepare_data(args)
    out = Path(args.work) / "out"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no metrics of an earlier one
    log_path = Path(args.work) / "sim.log"
    cmd = [str(BIN / "noprop-sim"), "--clients", str(args.clients), "--num-cpus", str(args.num_cpus),
           "--client-cpus", "1", "--partition", "iid", "--rounds", str(args.rounds), "--T", str(args.T),
           "--channels", args.channels, "--hidden", str(args.hidden), "--batch-size", "32",
           "--local-epochs", str(args.local_epochs), "--lr", str(args.lr),
           "--dataset", f"npz:{npz}", "--eval-limit", "0", "--final-eval-limit", "0", "--client-threads", "1",
           "--round-timeout", "3600", "--join-timeout", "3600", "--seed", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        driver: list[int] = []

        def focus() -> int | None:
            if not driver and (pid := find_driver(proc.pid)):
                driver.append(pid)
            return driver[0] if driver else None

        sampler = MemorySampler(proc.pid, args.interval, tree=True, focus=focus).start()
        seen, round_seen_at = 0, {}
        try:
            while proc.poll() is None:
                records = read_records(out / "metrics.jsonl")
                for r in records[seen:]:
                    round_seen_at[r["round"]] = round(time.monotonic() - start, 1)
                    pss = sampler.samples[-1][4] if sampler.samples else 0.0
                    print(f"round {r['round']}/{args.rounds}: accuracy {100 * r['accuracy']:.2f}%, "
                          f"{r['round_time_s']:.0f} s, tree PSS now {pss:.0f} MB", file=sys.stderr, flush=True)
                seen = len(records)
                time.sleep(2.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
            sampler.stop()
    wall = time.monotonic() - start
    after = uptime()
    records = read_records(out / "metrics.jsonl")
    done = json.loads((out / "DONE.json").read_text()) if (out / "DONE.json").exists() else {}
    samples = np.array(sampler.samples)
    rounds = [{"round": r["round"], "accuracy": r["accuracy"], "round_time_s": r["round_time_s"],
               "nodes_trained": len(r.get("trained_by", [])), "failed": r.get("failed", []),
               "finished_at_s": round_seen_at.get(r["round"])} for r in records]
    return {
        "exit_code": proc.returncode, "clients": args.clients, "rounds": args.rounds, "T": args.T,
        "channels": args.channels, "hidden": args.hidden, "batch_size": 32, "local_epochs": args.local_epochs,
        "lr": args.lr,
        "train_images": args.subset, "images_per_client": args.subset // args.clients,
        "eval_images": args.eval_images, "ray_cpus": args.num_cpus,
        "wall_s": round(wall, 1),
        "first_round_started_after_s": round(rounds[0]["finished_at_s"] - rounds[0]["round_time_s"], 1)
        if rounds and rounds[0]["finished_at_s"] is not None else None,
        "per_round": rounds, "final_accuracy": done.get("accuracy"),
        "server_rss_mb": {"peak_vmhwm": round(float(samples[:, 2].max()), 1),
                          "peak_sampled": round(float(samples[:, 1].max()), 1),
                          "end": round(float(samples[samples[:, 1] > 0][-1, 1]), 1)},
        "tree_mb": {"peak_rss_sum": round(float(samples[:, 3].max()), 1),
                    "peak_pss_sum": round(float(samples[:, 4].max()), 1),
                    "max_processes": int(samples[:, 5].max())},
        "tree_at_peak": sampler.peak_tree,
        "trace": [[round(float(v), 1) for v in row] for row in samples[:: max(1, len(samples) // 400)]],
        "trace_columns": ["t_s", "server_rss_mb", "server_hwm_mb", "tree_rss_mb", "tree_pss_mb", "processes"],
        "log": str(log_path), "machine": machine(), "uptime_before": before, "uptime_after": after,
        "command": " ".join(["python", *sys.argv]), "sim_command": " ".join(cmd[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def label(cmdline: str) -> str:
    """A process of the tree by its role."""
    if "-m noprop.ops.sim" in cmdline:
        return "simulation driver (ServerApp)"
    if "bin/noprop-sim" in cmdline:
        return "noprop-sim launcher"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0]
    parts = [Path(a).name for a in cmdline.split() if a.endswith(".py") or "/ray/" in a]
    return parts[0] if parts else Path(cmdline.split()[0]).name


def markdown(r: dict) -> str:
    srv, tree = r["server_rss_mb"], r["tree_mb"]
    lines = [
        f"`noprop-sim`: {r['clients']} virtual clients ({r['images_per_client']} Fashion-MNIST training images each, "
        f"IID), {r['rounds']} rounds, T={r['T']}, conv widths {r['channels']}, hidden {r['hidden']}, batch "
        f"{r['batch_size']}, {r.get('local_epochs', 1)} local epochs per round, lr {r.get('lr', 1e-3):g}; Ray with "
        f"{r['ray_cpus']} CPUs, 1 per client, 1 torch thread; the server evaluates "
        f"{r['eval_images']} test images per round. {r['date']}, exit code {r['exit_code']}.",
        "",
        "| round | accuracy | round wall time (s) | clients trained | no reply |",
        "|---:|---:|---:|---:|---|",
    ]
    for p in r["per_round"]:
        lines.append(f"| {p['round']} | {100 * p['accuracy']:.2f}% | {p['round_time_s']:.1f} | "
                     f"{p['nodes_trained']}/{r['clients']} | {', '.join(map(str, p['failed'])) or '-'} |")
    top = ", ".join(f"{label(p['name'])} {p['rss_mb']:.0f}" for p in r["tree_at_peak"].get("processes", [])[:7])
    lines += [
        "",
        "| memory | MB |", "|---|---:|",
        f"| server side (simulation driver running the ServerApp), peak RSS (VmHWM) | {srv['peak_vmhwm']:.0f} |",
        f"| server side, RSS at the end | {srv['end']:.0f} |",
        f"| whole process tree, peak of summed PSS (shared pages counted once) | {tree['peak_pss_sum']:.0f} |",
        f"| whole process tree, peak of summed RSS (shared pages counted per process) | {tree['peak_rss_sum']:.0f} |",
        "",
        f"Wall {r['wall_s']:.0f} s in all; round 1 began about {r['first_round_started_after_s']} s after the "
        "start (Ray start-up, the ServerApp's imports and test data; metrics polled every 2 s) and includes the "
        f"capacity discovery of all {r['clients']} nodes (a query each, which times a few training steps); up to "
        f"{tree['max_processes']} processes in the tree. At the PSS peak "
        f"(RSS MB per process): {top}. Machine: {r['machine']['cpu']}, {r['machine']['cpus']} CPUs, "
        f"{r['machine']['memory_gib']} GiB; `uptime` before: {r['uptime_before']}; after: {r['uptime_after']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_or_report(build_parser().parse_args(argv), run, markdown, lambda result: result["exit_code"] == 0)


if __name__ == "__main__":
    sys.exit(main())
