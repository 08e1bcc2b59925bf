"""NoProp-DT (one-hot, learned:20) against the backprop baseline with the same blocks, on real data.

Each variant runs in its own process (so peak memory is its own) through noprop-train's run(), with the
same data, epochs and seed. Prints a markdown table, writes bench/results/accuracy.json and a PNG of test
accuracy per epoch.

    .venv/bin/python bench/accuracy.py --epochs 3 --subset 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import peak_rss_kb, print_result, rss_kb, run_child

VARIANTS = {
    "dt-one-hot": {"method": "dt", "embedding": "one-hot"},
    "dt-learned20": {"method": "dt", "embedding": "learned:20"},
    "backprop-one-hot": {"method": "backprop", "embedding": "one-hot"},
}


def run_one(variant: str, args: argparse.Namespace) -> dict:
    """Runs inside the child process: train one variant, measure, return a record."""
    import torch

    from noprop.config import TrainConfig
    from noprop.ops import train_cli

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, epochs=args.epochs, subset=args.subset,
                      eval_limit=args.eval_limit, seed=args.seed, threads=args.threads, eval_mode="both",
                      out=str(Path(args.out) / variant), **VARIANTS[variant]).validate()
    rss_before = rss_kb()  # torch imported, data not yet loaded
    start = time.perf_counter()
    train_cli.run(cfg)
    from noprop.io import read_jsonl

    records = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    result = {"variant": variant, **VARIANTS[variant], "epochs": records,
              "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
              "rss_before_training_mb": round(rss_before / 1024, 1)}
    (Path(cfg.out) / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench/results/accuracy")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from OUT/*/result.json")
    args = p.parse_args()
    if args.report:
        results = [json.loads((Path(args.out) / v / "result.json").read_text()) for v in args.variants.split(",")
                   if (Path(args.out) / v / "result.json").exists()]
        print(table(results, args))
        plot(results, Path(args.out) / "accuracy.png")
        return 0
    if args.one:
        print_result(run_one(args.one, args))
        return 0

    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--dataset", args.dataset, "--data-root", args.data_root,
               "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads),
               "--out", args.out]
        cmd += ["--subset", str(args.subset)] if args.subset else []
        cmd += ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
        result = run_child(cmd, variant)
        if result is None:
            return 1
        results.append(result)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(table(results, args))
    plot(results, Path(args.out) / "accuracy.png")
    return 0


def table(results: list[dict], args: argparse.Namespace) -> str:
    head = ("| variant | " + " | ".join(f"ep {r['epoch']} det / sto" for r in results[0]["epochs"])
            + " | train s/epoch | samples/s/block | peak RSS MB |")
    rows = [head, "|" + "---|" * (len(results[0]["epochs"]) + 4)]
    for res in results:
        accs = " | ".join(f"{100 * e['test_acc_deterministic']:.2f} / {100 * e['test_acc_stochastic']:.2f}"
                          for e in res["epochs"])
        train_s = sum(e["train_time_s"] for e in res["epochs"]) / len(res["epochs"])
        sps = sum(e["samples_per_s_per_block"] for e in res["epochs"]) / len(res["epochs"])
        rss = "n/a" if res.get("peak_rss_mb") is None else f"{res['peak_rss_mb']:.0f}"
        rows.append(f"| {res['variant']} | {accs} | {train_s:.0f} | {sps:.0f} | {rss} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    from noprop.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        ep = [e["epoch"] for e in res["epochs"]]
        ax.plot(ep, [100 * e["test_acc_deterministic"] for e in res["epochs"]], marker="o", label=res["variant"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
