"""Federated NoProp-DT against its FedAvg peer, a plain CNN, side by side in one run (issue 10).

Every run is a `noprop-sim` command a user can paste (printed in the report): the same clients, seed, rounds,
local epochs, block widths and evaluation for every variant, under each partition of Fashion-MNIST's training
set. Variants:
- dt: NoProp-DT with the federation's defaults (server-trained head, balanced softmax on the clients);
- dt-paper: the paper's block and Eq. 8 alone (--head-steps 0 --no-logit-adjust --no-z-skip --min-local-steps 0):
  where the federation started;
- dt-replicate5: five owners a block, each on a fifth of its data (the same compute, 5x the bytes), for label skew
  so strong that one owner's labels cover a fifth of the classes;
- cnn: `--method cnn`, one block's x path plus a linear layer, trained with backprop and averaged by Flower's
  FedAvg: what a Flower user runs instead.
From each run's metrics.jsonl: accuracy per round, bytes per client per round, client training time per round and
its running total (client compute); from a fresh process per variant, a client's peak RSS over one round.
The small-shard case (3 clients x 500 images, 4 rounds, the federation's defaults) runs the same way.

    .venv/bin/python bench/federated_peer.py --benchmarks-md BENCHMARKS.md      # the benchmark (about 1 h)
    .venv/bin/python bench/federated_peer.py --report-only --benchmarks-md BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (  # bench/ is on sys.path: this script runs from there
    peak_rss_kb,
    replace_section,
    reset_peak_memory,
    rss_kb,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VARIANTS = {
    "dt": [],
    "dt-paper": ["--head-steps", "0", "--no-logit-adjust", "--no-z-skip", "--min-local-steps", "0"],
    "dt-replicate5": ["--policy", "replicate", "--replicas", "5", "--split-local-data"],
    "cnn": ["--method", "cnn"],
}
LABELS = {"dt": "NoProp-DT (defaults)",
          "dt-paper": "NoProp-DT trained by Eq. 8 alone (Figure 6 block, the clients' averaged head, no prior, no step "
                      "floor; the head still starts at the nearest embedding)",
          "dt-replicate5": "NoProp-DT, 5 owners a block, each on 1/5 of its data (--policy replicate --replicas 5 "
                           "--split-local-data)",
          "cnn": "FedAvg CNN (peer)"}
COLORS = {"dt": "tab:blue", "cnn": "tab:orange", "dt-paper": "tab:gray", "dt-replicate5": "tab:green"}
SHORT = {"dt": "NoProp-DT (defaults)", "cnn": "FedAvg CNN (peer)", "dt-paper": "NoProp-DT as in the paper",
         "dt-replicate5": "NoProp-DT, 5 owners a block"}
SECTION = "## Federated NoProp-DT against the FedAvg CNN (`bench/federated_peer.py`)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--partitions", default="iid,dirichlet:0.5,dirichlet:0.1,classes:2")
    p.add_argument("--variants", default="dt,cnn", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--paper-partitions", default="dirichlet:0.5",
                   help="partitions that also run dt-paper (empty: none)")
    p.add_argument("--replicate-partitions", default="dirichlet:0.1,classes:2",
                   help="partitions that also run dt-replicate5 (empty: none)")
    p.add_argument("--eval-limit", type=int, default=5000, help="test images evaluated each round (all at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small-rounds", type=int, default=4)
    p.add_argument("--skip", default="", help="comma list of parts to skip: main,central,small,memory")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated_peer"))
    p.add_argument("--reuse", action="store_true", help="keep runs whose DONE.json exists")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--benchmarks-md", default=None)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: memory VARIANT
    return p


# -- runs ------------------------------------------------------------------------------------------------


def sim_command(args: argparse.Namespace, run_dir: Path, partition: str, variant: str, *, clients: int,
                rounds: int, dataset: str, channels: str | None, eval_limit: int) -> list[str]:
    cmd = ["noprop-sim", "--clients", str(clients), "--partition", partition, "--rounds", str(rounds),
           "--num-cpus", "2", "--client-threads", "1", "--dataset", dataset, "--seed", str(args.seed),
           "--eval-limit", str(eval_limit), "--final-eval-limit", "0", "--out", str(run_dir)]
    if dataset == "fashion-mnist":
        cmd += ["--data-root", args.data_root]
    if channels:
        cmd += ["--channels", channels]
    return cmd + VARIANTS[variant]


def run_sim(cmd: list[str], run_dir: Path, reuse: bool) -> dict:
    done = run_dir / "DONE.json"
    if not (reuse and done.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        load = os.getloadavg()[0]
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            code = subprocess.call([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if code != 0 or not done.exists():
            raise SystemExit(f"{' '.join(cmd)} failed (exit {code}): see {run_dir.parent / (run_dir.name + '.log')}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        (run_dir / "bench.json").write_text(json.dumps({
            "command": " ".join(cmd), "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1),
            "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2)}))
    return summarise(run_dir)


def summarise(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = json.loads((run_dir / "DONE.json").read_text())
    bench = json.loads((run_dir / "bench.json").read_text())
    rounds, cumulative = [], 0.0
    for r in records:
        times = list(r.get("client_train_time_s", {}).values())
        cumulative += sum(times)
        mb = [v / 1e6 for v in r.get("bytes_to", {}).values()]
        mb_from = [v / 1e6 for v in r.get("bytes_from", {}).values()]
        rounds.append({
            "round": r["round"], "accuracy": r["accuracy"], "nearest_accuracy": r.get("nearest_accuracy"),
            "block_accuracy": r.get("block_accuracy"), "class_accuracy": r.get("class_accuracy"),
            "round_time_s": r.get("round_time_s"), "client_train_max_s": max(times, default=0.0),
            "client_train_sum_s": round(sum(times), 2), "client_cpu_cumulative_s": round(cumulative, 1),
            "mb_to_mean": sum(mb) / len(mb) if mb else 0.0,
            "mb_from_mean": sum(mb_from) / len(mb_from) if mb_from else 0.0,
            "examples": sum(r.get("num_examples", {}).values()),
        })
    return {"rounds": rounds, "final_accuracy": done["accuracy"], "final_eval_examples": done["eval_examples"],
            "final": {k: done.get(k) for k in ("nearest_accuracy", "block_accuracy", "class_accuracy")}, **bench}


def run_central(args: argparse.Namespace, out: Path, reuse: bool) -> dict:
    """Centralized NoProp-DT at the federated IID run's passes: there every block trains on one 1/C shard a round,
    so after R rounds it has seen R/C of the training set once; here one epoch on a class-stratified subset of
    that size, with the same block (z-skip), widths and seed."""
    run_dir = out / "runs" / "central"
    subset = 60000 * args.rounds // args.clients
    cmd = ["noprop-train", "--dataset", "fashion-mnist", "--data-root", args.data_root, "--subset", str(subset),
           "--epochs", "1", "--channels", args.channels, "--z-skip", "--eval-mode", "deterministic", "--threads", "2",
           "--seed", str(args.seed), "--out", str(run_dir)]
    metrics = run_dir / "metrics.jsonl"
    if not (reuse and metrics.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
        start = time.perf_counter()
        with open(out / "runs" / "central.log", "w") as log:
            code = subprocess.call([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {code})")
        (run_dir / "bench.json").write_text(json.dumps({"wall_s": round(time.perf_counter() - start, 1)}))
    record = json.loads(metrics.read_text().splitlines()[-1])
    return {"command": " ".join(cmd), "accuracy": record["test_acc_deterministic"], "subset": subset,
            "train_time_s": record["train_time_s"], **json.loads((run_dir / "bench.json").read_text())}


def small_npz(out: Path, data_root: str, seed: int) -> Path:
    """3 clients x 500: a class-stratified 1500-image subset of Fashion-MNIST's training set, all 10 000 test."""
    import numpy as np
    import torchvision

    from noprop.data import _stratified_subset
    from noprop.fetch import fetch_fashion_mnist

    path = out / "data" / "fashion-mnist-1500.npz"
    if not path.exists():
        fetch_fashion_mnist(data_root, log=lambda _: None)
        train = torchvision.datasets.FashionMNIST(data_root, train=True)
        test = torchvision.datasets.FashionMNIST(data_root, train=False)
        idx = _stratified_subset(train.targets.numpy(), 1500, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_train=train.data.numpy()[idx], y_train=train.targets.numpy()[idx],
                 x_test=test.data.numpy(), y_test=test.targets.numpy(), classes=np.array(train.classes))
    return path


# -- one client's memory over one round, in a fresh process -----------------------------------------------


def part_memory(args: argparse.Namespace, variant: str) -> dict:
    """RSS before and peak RSS of a process that is one client: the real ClientApp train handler on one message
    (NoProp-DT: one block plus the shared tensors; CNN: the whole network) over a 6000-image shard."""
    import torch
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from noprop.client.app import make_client_app
    from noprop.client.handlers import local_data
    from noprop.federation import FederationConfig
    from noprop.methods import build_model
    from noprop.protocol import TrainInstructions
    from noprop.records import arrays_to_record, to_numpy_state
    from noprop.server.aggregate import keys_for_blocks

    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as Flower's runtime does
    method = "cnn" if variant == "cnn" else "dt"
    cfg = FederationConfig(method=method, channels=args.channels, data_root=args.data_root, seed=args.seed).validate()
    node = {"data": "fashion-mnist", "data-root": args.data_root, "partition-id": 0,
            "num-partitions": args.clients, "threads": 1}
    data = local_data("fashion-mnist", args.data_root, "train", 0, args.clients, "iid", args.seed)
    model_cfg = cfg.model_config(data.input_shape, data.num_classes)
    torch.manual_seed(0)
    state = to_numpy_state(build_model(method, model_cfg).state_dict())
    keys = keys_for_blocks(state, [1]) if method == "dt" else list(state)  # dt: one block (and the shared parts)
    ins = TrainInstructions.for_run(cfg, model_cfg).for_node(1, (1,) if method == "dt" else (), "memory-probe")
    config = ins.to_record()
    arrays = arrays_to_record(state, keys)
    del state
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=5, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # the SuperLink sets this on delivery
    ctx = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
    app = make_client_app(cfg.to_run_config())
    before_mb = rss_kb() / 1024
    if not reset_peak_memory():  # VmHWM := VmRSS: the peak from here on is the round's
        raise SystemExit("this kernel refuses to reset VmHWM (/proc/self/clear_refs): no per-round peak")
    start = time.perf_counter()
    reply = app(msg, ctx)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_kb() / 1024
    return {"variant": variant, "rss_before_mb": round(before_mb, 1), "peak_rss_mb": round(peak_mb, 1),
            "message_mb": round(arrays.count_bytes() / 1e6, 3), "reply_mb": round(
                reply.content["arrays"].count_bytes() / 1e6, 3), "handler_s": round(seconds, 1),
            "examples": len(data)}


def run_memory(args: argparse.Namespace, variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", variant, "--channels", args.channels,
                          "--clients", str(args.clients), "--data-root", args.data_root, "--seed", str(args.seed)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------------


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def report(results: dict, args: argparse.Namespace) -> str:
    main = results.get("main", {})
    lines = [SECTION, ""]
    meta = results["meta"]
    lines += [f"Run {meta['finished']} on {meta['machine']}; load average {meta['load_start']} at the start, "
              f"{meta['load_end']} at the end (nothing else ran). Wall and CPU seconds of every run are in its "
              "row.", "",
              f"Fashion-MNIST, the full 60 000-image training set split among {args.clients} clients, T = 10, conv "
              f"widths {args.channels}, {args.rounds} rounds of 1 local epoch, batch 128, AdamW lr 1e-3, seed "
              f"{args.seed} for partitions and weights, 1 torch thread per client, Ray with 2 CPUs. Each round's "
              f"accuracy is on the first {args.eval_limit} test images; 'final' is on all 10 000. Every run is "
              "one `noprop-sim` command (below); the only difference between dt and cnn is `--method cnn`.", ""]
    for partition, runs in main.items():
        lines += [f"### {partition}", "", "| variant | " + " | ".join(f"r{r['round']}" for r in
                  next(iter(runs.values()))["rounds"]) + " | final | MB to / from a client per round | client "
                  "train s per round (max) | client CPU s, cumulative | wall s | launcher + server CPU s |",
                  "|---|" + "---|" * (len(next(iter(runs.values()))["rounds"]) + 6)]
        for variant, run in runs.items():
            rs = run["rounds"]
            lines.append(f"| {LABELS[variant]} | " + " | ".join(pct(r["accuracy"]) for r in rs)
                         + f" | **{pct(run['final_accuracy'])}** | {rs[-1]['mb_to_mean']:.2f} / "
                         f"{rs[-1]['mb_from_mean']:.2f} | {sum(r['client_train_max_s'] for r in rs) / len(rs):.1f} | "
                         f"{rs[-1]['client_cpu_cumulative_s']:.0f} | {run['wall_s']:.0f} | {run['cpu_s']:.0f} |")
        dt = runs.get("dt")
        if dt:
            blocks = dt["final"]["block_accuracy"] or {}
            lines += ["", f"dt readouts at the end (all 10 000 test images): head {pct(dt['final_accuracy'])}%, "
                      f"nearest embedding of z_T {pct(dt['final']['nearest_accuracy'])}%, blocks "
                      f"{pct(min(blocks.values(), default=None))}-{pct(max(blocks.values(), default=None))}%; "
                      "per class: " + ", ".join(f"{k} {pct(v)}" for k, v in
                                                (dt["final"]["class_accuracy"] or {}).items()) + "."]
        lines += ["", "Commands:", "", "```"] + [runs[v]["command"] for v in runs] + ["```", ""]
    if "small" in results:
        lines += ["### Small shards: 3 clients x 500 images, 4 rounds, the federation's defaults", "",
                  "A class-stratified 1500-image subset of Fashion-MNIST's training set, IID among 3 clients "
                  "(full-width blocks 32,64,128), all 10 000 test images every round.", "",
                  "| variant | " + " | ".join(f"r{i}" for i in range(1, args.small_rounds + 1))
                  + " | client CPU s, cumulative | MB to a client per round |",
                  "|---|" + "---|" * (args.small_rounds + 2)]
        for variant, run in results["small"].items():
            rs = run["rounds"]
            lines.append(f"| {LABELS[variant]} | " + " | ".join(pct(r["accuracy"]) for r in rs)
                         + f" | {rs[-1]['client_cpu_cumulative_s']:.0f} | {rs[-1]['mb_to_mean']:.2f} |")
        lines += ["", "```"] + [r["command"] for r in results["small"].values()] + ["```", ""]
    if "memory" in results:
        lines += ["### One client's memory over one round (fresh process, the real ClientApp train handler, "
                  f"{args.channels} widths, a 6000-image shard)", "",
                  "RSS before = the process with torch, the client app and its 6000-image shard loaded; peak = VmHWM "
                  "over the round (reset just before the handler), so peak - before is what the round itself "
                  "needs.", "",
                  "| variant | message MB | RSS before MB | peak RSS MB | round's growth MB | handler s |",
                  "|---|---|---|---|---|---|"]
        for m in results["memory"].values():
            lines.append(f"| {LABELS[m['variant']]} | {m['message_mb']:.2f} | {m['rss_before_mb']:.0f} | "
                         f"{m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - m['rss_before_mb']:.0f} | "
                         f"{m['handler_s']:.1f} |")
        lines.append("")
    lines += goals(results)
    lines += ["Plots: bench/results/federated_peer/accuracy.png (accuracy per round, every variant and partition) "
              "and compute.png (accuracy against cumulative client CPU seconds).", ""]
    return "\n".join(lines)


def at_compute(run: dict, cpu_s: float) -> float:
    """The run's accuracy at a cumulative client CPU budget, linearly between its rounds (its last beyond them)."""
    pts = [(0.0, 0.1)] + [(r["client_cpu_cumulative_s"], r["accuracy"]) for r in run["rounds"]]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if cpu_s <= x1:
            return y0 + (y1 - y0) * (cpu_s - x0) / max(x1 - x0, 1e-9)
    return pts[-1][1]


def goals(results: dict) -> list[str]:
    """Issue 10's goals, read off this run."""
    main = results.get("main", {})
    out = ["### Goals (issue 10), read off this run", ""]
    dt = {p: runs["dt"] for p, runs in main.items() if "dt" in runs}
    iid = dt.get("iid")
    if iid:
        out.append(f"- Round 1 at least 60% IID: {pct(iid['rounds'][0]['accuracy'])}%.")
        for partition, bound in (("dirichlet:0.5", 2.0), ("classes:2", 5.0), ("dirichlet:0.1", None)):
            if partition in dt:
                gap = 100 * (iid["final_accuracy"] - dt[partition]["final_accuracy"])
                verdict = "" if bound is None else (" (holds)" if gap <= bound else " (missed)")
                out.append(f"- {partition}: {pct(dt[partition]['final_accuracy'])}% against IID "
                           f"{pct(iid['final_accuracy'])}%, {gap:.1f} points below"
                           + (f"; goal within {bound:g}" if bound else "") + verdict + ".")
    peer_iid = main.get("iid", {}).get("cnn")
    start = next((r["round"] for r in peer_iid["rounds"] if r["accuracy"] >= 0.85), None) if peer_iid else None
    if start is not None:
        out.append(f"- Against the peer at equal cumulative client CPU seconds, from round {start} (the peer's first "
                   "round at 85% IID): dt's accuracy minus the peer's at dt's compute (goal: at least -3 points):")
        for partition, runs in main.items():
            if "dt" in runs and "cnn" in runs:
                diffs = [100 * (r["accuracy"] - at_compute(runs["cnn"], r["client_cpu_cumulative_s"]))
                         for r in runs["dt"]["rounds"] if r["round"] >= start]
                out.append(f"  - {partition}: " + ", ".join(f"{d:+.1f}" for d in diffs)
                           + (" (holds)" if diffs and min(diffs) >= -3 else " (missed)"))
    central = results.get("central")
    if central and iid:
        gap = 100 * (iid["final_accuracy"] - central["accuracy"])
        out.append(f"- IID against centralized NoProp-DT at equal passes (one epoch on {central['subset']} images, "
                   f"`{central['command']}`): {pct(iid['final_accuracy'])}% against {pct(central['accuracy'])}%, "
                   f"{gap:+.1f} points; goal within 1" + (" (holds)." if abs(gap) <= 1 or gap > 0 else " (missed)."))
    small = results.get("small", {})
    if "dt" in small and "cnn" in small:
        d, c = small["dt"]["rounds"], small["cnn"]["rounds"]
        out.append(f"- Small shards: dt {pct(d[-1]['accuracy'])}% against the peer's {pct(c[-1]['accuracy'])}% after "
                   f"{len(d)} rounds; round 1 {pct(d[0]['accuracy'])}% (chance 10%).")
    return out + [""]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = results.get("main", {})
    if not main:
        return
    for name, xkey, xlabel in (("accuracy.png", "round", "round"),
                               ("compute.png", "client_cpu_cumulative_s", "cumulative client CPU seconds")):
        fig, axes = plt.subplots(1, len(main), figsize=(4.2 * len(main), 3.8), sharey=True, squeeze=False)
        for ax, (partition, runs) in zip(axes[0], main.items()):
            for variant, run in runs.items():
                xs = [r[xkey] for r in run["rounds"]]
                ax.plot(xs, [100 * r["accuracy"] for r in run["rounds"]], marker="o", color=COLORS[variant],
                        label=SHORT[variant])
            ax.set_title(partition)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("test accuracy (%)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def main() -> int:
    args = build_parser().parse_args()
    if args.part:
        print(json.dumps(part_memory(args, args.part)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    skip = set(filter(None, args.skip.split(",")))
    if args.report_only:
        results = json.loads(results_path.read_text())
    else:
        results = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                            "load_start": round(os.getloadavg()[0], 2)}}
        previous = json.loads(results_path.read_text()) if args.reuse and results_path.exists() else {}
        started = time.perf_counter()
        variants = [v for v in args.variants.split(",") if v]
        paper = set(filter(None, args.paper_partitions.split(",")))
        replicate = set(filter(None, args.replicate_partitions.split(",")))
        if "main" not in skip:
            results["main"] = {}
            for partition in args.partitions.split(","):
                runs = {}
                extra = (["dt-paper"] if partition in paper else []) + (["dt-replicate5"] if partition in replicate
                                                                         else [])
                for variant in variants + extra:
                    run_dir = out / "runs" / f"{partition.replace(':', '')}-{variant}"
                    cmd = sim_command(args, run_dir, partition, variant, clients=args.clients, rounds=args.rounds,
                                      dataset="fashion-mnist", channels=args.channels, eval_limit=args.eval_limit)
                    print(f"[bench] {' '.join(cmd)}", flush=True)
                    runs[variant] = run_sim(cmd, run_dir, args.reuse)
                    print(f"[bench] {partition} {variant}: " + ", ".join(pct(r["accuracy"]) for r in runs[variant]
                          ["rounds"]) + f"; final {pct(runs[variant]['final_accuracy'])}", flush=True)
                results["main"][partition] = runs
        if "central" not in skip:
            results["central"] = run_central(args, out, args.reuse)
        if "small" not in skip:
            npz = small_npz(out, args.data_root, args.seed)
            results["small"] = {}
            for variant in variants:
                run_dir = out / "runs" / f"small-{variant}"
                cmd = sim_command(args, run_dir, "iid", variant, clients=3, rounds=args.small_rounds,
                                  dataset=f"npz:{npz}", channels=None, eval_limit=0)
                print(f"[bench] {' '.join(cmd)}", flush=True)
                results["small"][variant] = run_sim(cmd, run_dir, args.reuse)
        if "memory" not in skip:
            results["memory"] = {v: run_memory(args, v) for v in variants}
        results["meta"].update({"load_end": round(os.getloadavg()[0], 2),
                                "wall_s": round(time.perf_counter() - started),
                                "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        if "meta" in previous:  # a re-run that reused the runs keeps the conditions they ran under
            results["meta"] = previous["meta"]
        results_path.write_text(json.dumps(results, indent=1))
    plot(results, out)
    text = report(results, args)
    print(text)
    if args.benchmarks_md:
        replace_section(Path(args.benchmarks_md), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
