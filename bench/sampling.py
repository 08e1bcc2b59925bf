"""Client sampling at equal client-epochs: full participation against --fraction-train F, NoProp-DT and its
FedAvg CNN peer, side by side in one run (issue 25).

N virtual clients on Fashion-MNIST's training set (noprop-sim, the product's defaults but the widths 16,32,64 of
bench/federated_peer.py). Full participation runs R rounds; sampling F runs R / F rounds, so both spend the same
client-rounds (each client-round is one local epoch, raised by the step floor alike in both). Every run is a
`noprop-sim` command a user can paste. Writes OUT/results.json and OUT/sampling.png (accuracy against
client-rounds).

    .venv/bin/python bench/sampling.py --clients 100 --fraction 0.1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

from federated_peer import ROOT, run_sim, sim_command  # bench/ is on sys.path: this script runs from there


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2, help="rounds of full participation (sampling: rounds / F)")
    p.add_argument("--partition", default="iid")
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--variants", default="dt,cnn")
    p.add_argument("--eval-limit", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sampling"))
    p.add_argument("--reuse", action="store_true", help="keep runs whose DONE.json exists")
    p.add_argument("--skip", default="", help="comma list of runs to leave out, e.g. 'cnn full'")
    return p


def main() -> int:
    args = build_parser().parse_args()
    out = Path(args.out)
    sampled_rounds = math.ceil(args.rounds / args.fraction)
    results = {"clients": args.clients, "fraction": args.fraction, "partition": args.partition,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "runs": {}}
    for variant in args.variants.split(","):
        sampling = ["--fraction-train", str(args.fraction)]
        for label, rounds, extra in (("full", args.rounds, []), (f"F={args.fraction:g}", sampled_rounds, sampling)):
            if f"{variant} {label}" in args.skip.split(","):
                continue
            run_dir = out / "runs" / f"{variant}-{label}"
            cmd = sim_command(args, run_dir, args.partition, variant, clients=args.clients, rounds=rounds,
                              dataset="fashion-mnist", channels=args.channels, eval_limit=args.eval_limit) + extra
            print("[bench]", " ".join(cmd), flush=True)
            summary = run_sim(cmd, run_dir, args.reuse)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            client_rounds, curve = 0, []
            for r in records:
                client_rounds += len(r.get("trained_by", []))
                curve.append((client_rounds, r["accuracy"]))
            summary.update(command=" ".join(cmd), curve=curve, client_rounds=client_rounds)
            results["runs"][f"{variant} {label}"] = summary
            print(f"[bench] {variant} {label}: final {summary['final_accuracy']:.2%} after {client_rounds} "
                  f"client-rounds, {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} CPU s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "sampling.png")
    print("\n| run | final accuracy | client-rounds | wall s | CPU s | load at start |\n|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['final_accuracy']:.2%} | {r['client_rounds']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
              f"{r['load_start']:.2f} |")
    print(f"\nresults: {out / 'results.json'}, plot: {out / 'sampling.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["runs"].items():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=name)
    ax.set_xlabel("client-rounds so far (local epochs spent)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['clients']} clients, {results['partition']}: full participation vs sampling")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
