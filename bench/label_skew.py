"""NoProp-DT against its FedAvg peer under label skew (issue 21), side by side, over several seeds.

Each cell is one `noprop-sim` command (printed in the report) for every (clients, rounds, split, variant, seed):
the same clients, split, seed, rounds, widths and evaluation for NoProp-DT with the product's defaults and for
`--method cnn` (plain FedAvg of a CNN, what a Flower user runs instead). Since issue 28 a seed repeats a run, so
the spread over seeds is the spread of the partition and the initial weights, not of Flower's node ids.

    .venv/bin/python bench/label_skew.py --clients 10 --rounds 6 --seeds 0,1,2          # about 1 h alone
    .venv/bin/python bench/label_skew.py --clients 50 --splits classes:2,dirichlet:0.1 --seeds 0
    .venv/bin/python bench/label_skew.py --clients 10 --rounds 20 --splits dirichlet:0.1 --seeds 0
    .venv/bin/python bench/label_skew.py --report-only --benchmarks-md BENCHMARKS.md

Results accumulate in bench/results/label_skew/results.json (a finished run is reused unless --fresh); the
report covers every configuration run so far, with plots of accuracy per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchlib import replace_section  # bench/ is on sys.path: this script runs from there
from federated_peer import run_sim, summarise

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "dt": [],
    "cnn": ["--method", "cnn"],
    "dt-chain": ["--readout", "chain"],
    "dt-T2": ["--T", "2"],
    "dt-T5": ["--T", "5"],
    "dt-T5-chain": ["--T", "5", "--readout", "chain"],
    "dt-blind": ["--no-label-aware", "--no-coverage-step"],
    "dt-blind-chain": ["--no-label-aware", "--no-coverage-step", "--readout", "chain"],
    "dt-zd5": ["--z-dropout", "0.5"],
    "dt-stay": ["--policy", "stay"],
    "dt-stay-zd5": ["--policy", "stay", "--z-dropout", "0.5"],
}
LABELS = {"dt": "NoProp-DT (defaults: ensemble readout)", "cnn": "FedAvg CNN (peer)",
          "dt-chain": "NoProp-DT, --readout chain", "dt-T2": "NoProp-DT, T = 2", "dt-T5": "NoProp-DT, T = 5",
          "dt-T5-chain": "NoProp-DT, T = 5, --readout chain",
          "dt-blind": "NoProp-DT, label-blind plan, full steps",
          "dt-blind-chain": "NoProp-DT, label-blind plan, full steps, --readout chain (before issue 21)",
          "dt-zd5": "NoProp-DT, --z-dropout 0.5", "dt-stay": "NoProp-DT, --policy stay",
          "dt-stay-zd5": "NoProp-DT, --policy stay --z-dropout 0.5"}
COLORS = {"dt": "tab:blue", "cnn": "tab:orange", "dt-chain": "tab:cyan", "dt-T2": "tab:green", "dt-T5": "tab:olive",
          "dt-T5-chain": "tab:brown", "dt-blind": "tab:gray", "dt-blind-chain": "silver",
          "dt-zd5": "tab:red", "dt-stay": "tab:purple", "dt-stay-zd5": "tab:pink"}
SECTION = "## Label skew: NoProp-DT against the FedAvg CNN over seeds (`bench/label_skew.py`)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--splits", default="iid,dirichlet:0.5,dirichlet:0.1,classes:2")
    p.add_argument("--variants", default="dt,cnn", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--eval-limit", type=int, default=5000, help="test images evaluated each round (all at the end)")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "label_skew"))
    p.add_argument("--fresh", action="store_true", help="run again even where a finished run exists")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--benchmarks-md", default=None)
    return p


def command(args: argparse.Namespace, run_dir: Path, split: str, variant: str, seed: int) -> list[str]:
    return ["noprop-sim", "--clients", str(args.clients), "--partition", split, "--rounds", str(args.rounds),
            "--num-cpus", "2", "--client-threads", "1", "--dataset", "fashion-mnist", "--data-root", args.data_root,
            "--seed", str(seed), "--eval-limit", str(args.eval_limit), "--final-eval-limit", "0",
            "--channels", args.channels, "--out", str(run_dir), *VARIANTS[variant]]


def key(clients: int, rounds: int, split: str, variant: str, seed: int) -> str:
    return f"{clients}c-{rounds}r-{split.replace(':', '')}-{variant}-s{seed}"


def final_readouts(run_dir: Path) -> dict:
    done = json.loads((run_dir / "DONE.json").read_text())
    classes = done.get("class_accuracy") or {}
    return {"class_accuracy": classes, "min_class": min(classes.values()) if classes else None,
            "chain_accuracy": done.get("chain_accuracy"), "ensemble_accuracy": done.get("ensemble_accuracy")}


# -- report ----------------------------------------------------------------------------------------------------


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return pct(values[0])
    return f"{pct(statistics.mean(values))} ({pct(min(values))}-{pct(max(values))})"


def readouts(runs: list[dict]) -> str:
    """The final chain and ensemble accuracy of the same weights (dt runs since --readout; chain only before)."""
    def mean_of(k):
        values = [r.get(k) for r in runs]
        return None if None in values else statistics.mean(values)
    chain, ensemble = mean_of("chain_accuracy"), mean_of("ensemble_accuracy")
    return "" if chain is None and ensemble is None else f"{pct(chain)} / {pct(ensemble)}"


def cells(results: dict, clients: int, rounds: int, split: str, variant: str) -> list[dict]:
    """Every seed's run of one configuration (matched on its fields: "dt-s" is also how "dt-stay-..." begins)."""
    return [v for _, v in sorted(results["runs"].items())
            if (v["clients"], v["num_rounds"], v["split"], v["variant"]) == (clients, rounds, split, variant)]


def report(results: dict) -> str:
    lines = [SECTION, "",
             "Fashion-MNIST, the full 60 000-image training set split among the clients, conv widths 16,32,64, 1 "
             "local epoch a round, batch 128, AdamW lr 1e-3, 1 torch thread per client, Ray with 2 CPUs; accuracy "
             "per round on the first 5000 test images, final on all 10 000. dt is NoProp-DT with every default "
             "(T = 10, label-aware plan, coverage step), cnn is `--method cnn`; other rows change only the flags "
             "they name. Several seeds: the mean, with the lowest and highest in brackets. 'worst class' is the "
             "lowest per-class accuracy at the end (the mean over seeds). MB and client train s are per client "
             "per round; client CPU s is the sum over clients and rounds.", ""]
    configs = sorted({(r["clients"], r["num_rounds"]) for r in results["runs"].values()})
    for clients, rounds in configs:
        lines += [f"### {clients} clients, {rounds} rounds", ""]
        splits = list(dict.fromkeys(r["split"] for r in results["runs"].values()
                                    if (r["clients"], r["num_rounds"]) == (clients, rounds)))
        for split in splits:
            variants = [v for v in VARIANTS if cells(results, clients, rounds, split, v)]
            shown = [r for r in range(1, rounds + 1) if rounds <= 8 or r in (1, 2, 5, 10, 15, 20) or r == rounds]
            lines += [f"#### {split}", "",
                      "| variant | seeds | " + " | ".join(f"r{r}" for r in shown) + " | final | final: chain / "
                      "ensemble | worst class | MB to / from | client train s | client CPU s | wall s |",
                      "|---|---|" + "---|" * (len(shown) + 7)]
            for variant in variants:
                runs = cells(results, clients, rounds, split, variant)
                per_round = [statistics.mean(run["rounds"][r - 1]["accuracy"] for run in runs) for r in shown]
                worst = [run["min_class"] for run in runs if run["min_class"] is not None]
                last = runs[0]["rounds"][-1]
                train_s = statistics.mean(r["client_train_max_s"] for run in runs for r in run["rounds"])
                lines.append(
                    f"| {LABELS[variant]} | {','.join(str(run['seed']) for run in runs)} | "
                    + " | ".join(pct(v) for v in per_round)
                    + f" | **{spread([run['final_accuracy'] for run in runs])}** | {readouts(runs)} | "
                    f"{pct(statistics.mean(worst)) if worst else 'n/a'} | {last['mb_to_mean']:.2f} / "
                    f"{last['mb_from_mean']:.2f} | {train_s:.1f} | "
                    f"{statistics.mean(run['rounds'][-1]['client_cpu_cumulative_s'] for run in runs):.0f} | "
                    f"{statistics.mean(run['wall_s'] for run in runs):.0f} |")
            lines += ["", "```"] + [cells(results, clients, rounds, split, v)[0]["command"] for v in variants]
            lines += ["```", ""]
    lines += goals(results)
    machines = sorted({r["machine"] for r in results["runs"].values()})
    loads = [r[k] for r in results["runs"].values() for k in ("load_start", "load_end")]
    lines += [f"Machine: {'; '.join(machines)}. Load average over the runs: {min(loads):.2f}-{max(loads):.2f} "
              "(1-minute, read at each run's start and end). Above 2 the machine was shared (2 or 3 runs at a time, "
              "other jobs): then compare accuracy and bytes between rows, not the seconds. Plot: "
              "bench/results/label_skew/accuracy.png.", ""]
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """Issue 21's goals, read off the runs there are."""
    out = ["### Goals (issue 21), read off these runs", ""]

    def final(clients, rounds, split, variant):
        runs = cells(results, clients, rounds, split, variant)
        return statistics.mean(r["final_accuracy"] for r in runs) if runs else None

    for split, margin in (("iid", 0), ("dirichlet:0.5", 0), ("dirichlet:0.1", 3), ("classes:2", 3)):
        dt, cnn = final(10, 6, split, "dt"), final(10, 6, split, "cnn")
        if dt is not None and cnn is not None:
            diff = 100 * (dt - cnn)
            out.append(f"- 10 clients, {split}: dt {pct(dt)}% against the peer's {pct(cnn)}%, {diff:+.1f} points "
                       f"(goal: {'+' if margin else 'at least '}{margin or 0}{' or more' if margin else ''}; "
                       f"{'holds' if diff >= margin else 'missed'}).")
    iid, d05 = final(10, 6, "iid", "dt"), final(10, 6, "dirichlet:0.5", "dt")
    if iid is not None and d05 is not None:
        gap = 100 * (iid - d05)
        verdict = "holds" if gap <= 2 else "missed"
        out.append(f"- Dirichlet(0.5) {gap:.1f} points below IID (goal: within 2; {verdict}).")
    worst = [(k, r["min_class"]) for k, r in results["runs"].items()
             if r["variant"] == "dt" and r["clients"] == 10 and r["num_rounds"] == 6 and r["min_class"] is not None]
    if worst:
        k, v = min(worst, key=lambda kv: kv[1])
        out.append(f"- Every class at least 25% at the end: the lowest is {pct(v)}% ({k}; "
                   f"{'holds' if v >= 0.25 else 'missed'}).")
    for split in ("classes:2", "dirichlet:0.1"):
        dt, cnn = final(50, 6, split, "dt"), final(50, 6, split, "cnn")
        if dt is not None and cnn is not None:
            out.append(f"- 50 clients, {split}: dt {pct(dt)}% against {pct(cnn)}% "
                       f"({'holds' if dt >= cnn else 'missed'}).")
    dt_runs, cnn_runs = cells(results, 10, 20, "dirichlet:0.1", "dt"), cells(results, 10, 20, "dirichlet:0.1", "cnn")
    if dt_runs and cnn_runs:
        behind = [r["round"] for r, c in zip(dt_runs[0]["rounds"], cnn_runs[0]["rounds"])
                  if r["round"] >= 5 and r["accuracy"] < c["accuracy"]]
        out.append("- 20 rounds of Dirichlet(0.1): dt at or above the peer from round 5 "
                   + ("at every round (holds)." if not behind else f"except rounds {behind} (missed)."))
    return out + [""]


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["clients"], r["num_rounds"], r["split"]) for r in results["runs"].values()})
    if not panels:
        return
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, (clients, rounds, split) in zip(axes.flat, panels):
        for variant in VARIANTS:
            for i, run in enumerate(cells(results, clients, rounds, split, variant)):
                ax.plot([r["round"] for r in run["rounds"]], [100 * r["accuracy"] for r in run["rounds"]],
                        color=COLORS[variant], alpha=0.9 if i == 0 else 0.4, marker="o", markersize=3,
                        label=LABELS[variant] if i == 0 else None)
        ax.set_title(f"{split}, {clients} clients", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def save_run(path: Path, name: str, summary: dict) -> dict:
    """Add one run to results.json under a lock: several bench processes may share it (two at a time on 2 cores)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        results["runs"][name] = summary
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
    return results


def main() -> int:
    args = build_parser().parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for name, run in results["runs"].items():  # entries an earlier version saved with the round count as "rounds"
        if isinstance(run.get("rounds"), int):
            fixed = {**run, **summarise(out / "runs" / name), "num_rounds": run["rounds"]}
            results = save_run(path, name, fixed)
    if not args.report_only:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
        for seed in [int(s) for s in args.seeds.split(",")]:
            for split in args.splits.split(","):
                for variant in args.variants.split(","):
                    name = key(args.clients, args.rounds, split, variant, seed)
                    if name in results["runs"] and not args.fresh:
                        continue
                    run_dir = out / "runs" / name
                    (run_dir / "DONE.json").unlink(missing_ok=True)
                    cmd = command(args, run_dir, split, variant, seed)
                    print(f"[bench] {' '.join(cmd)}", flush=True)
                    summary = run_sim(cmd, run_dir, reuse=False)
                    summary.update(final_readouts(run_dir), clients=args.clients, num_rounds=args.rounds, split=split,
                                   variant=variant, seed=seed, machine=machine,
                                   finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
                    results = save_run(path, name, summary)  # each run lands as soon as it ends
                    print(f"[bench] {name}: " + ", ".join(pct(r["accuracy"]) for r in summary["rounds"])
                          + f"; final {pct(summary['final_accuracy'])}, worst class {pct(summary['min_class'])}",
                          flush=True)
    plot(results, out)
    text = report(results)
    print(text)
    if args.benchmarks_md:
        replace_section(Path(args.benchmarks_md), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
