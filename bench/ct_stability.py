"""NoProp-CT's epoch-to-epoch stability: the L2 weight (Eq. 9's SNR'(t) or -gamma'(t)) x gradient-norm clipping.

Each setting trains `noprop-train --method ct` for the same epochs on the same class-stratified subset, in its
own process (OUT/<setting>/, resumable: a setting whose metrics.jsonl has every epoch is not run again). The
report gives, per setting, the largest change of test accuracy from one epoch to the next over the last 10
epochs (issue 12's goal: at most 2 points at the defaults), the range and the final accuracy, and writes a plot
of test accuracy per epoch (OUT/curves.png). "off" clipping is a cap of 1e9, so that the gradient norms are
still recorded.

    .venv/bin/python bench/ct_stability.py --subset 6000 --epochs 30 --eval-limit 2000 --jobs 2
    .venv/bin/python bench/ct_stability.py --report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETTINGS = {  # name -> noprop-train flags
    "snr, no clip": ["--ct-l2-weight", "snr", "--grad-clip", "1e9"],
    "snr, clip 1": ["--ct-l2-weight", "snr", "--grad-clip", "1"],
    "log-snr, no clip": ["--ct-l2-weight", "log-snr", "--grad-clip", "1e9"],
    "log-snr, clip 1 (default)": ["--ct-l2-weight", "log-snr", "--grad-clip", "1"],
}


def folder(out: Path, name: str) -> Path:
    return out / name.split(" (")[0].replace(", ", "-").replace(" ", "")


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(args: argparse.Namespace, name: str) -> bool:
    run = folder(Path(args.out), name)
    if len(records(run)) >= args.epochs:
        print(f"done already: {run}", flush=True)
        return True
    cmd = [str(Path(sys.executable).parent / "noprop-train"), "--method", "ct", "--dataset", args.dataset,
           "--data-root", args.data_root, "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--seed", str(args.seed), "--eval-mode", "both", "--out", str(run), *SETTINGS[name]]
    for flag, value in (("--subset", args.subset), ("--eval-limit", args.eval_limit)):
        cmd += [flag, str(value)] if value else []
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(run.with_suffix(".log"), "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def summary(rs: list[dict], last: int = 10) -> dict:
    det = [100 * r["test_acc_deterministic"] for r in rs]
    sto = [100 * r["test_acc_stochastic"] for r in rs]
    tail = range(max(1, len(rs) - last), len(rs))
    return {"epochs": len(rs), "det_step": max(abs(det[i] - det[i - 1]) for i in tail),
            "sto_step": max(abs(sto[i] - sto[i - 1]) for i in tail), "det_min": min(det[-last:]),
            "det_max": max(det[-last:]), "det_final": det[-1], "sto_final": sto[-1],
            "train_s": sum(r["train_time_s"] for r in rs) / len(rs)}


def report(out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| setting | epochs | largest epoch-to-epoch change, last 10 epochs: det / sto (points) "
             "| det range, last 10 | final det / sto % | train s / epoch |", "|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in SETTINGS:
        rs = records(folder(out, name))
        if len(rs) < 2:
            continue
        s = summary(rs)
        lines.append(f"| {name} | {s['epochs']} | {s['det_step']:.2f} / {s['sto_step']:.2f} | "
                     f"{s['det_min']:.1f}-{s['det_max']:.1f} | {s['det_final']:.2f} / {s['sto_final']:.2f} | "
                     f"{s['train_s']:.1f} |")
        ax.plot([r["epoch"] for r in rs], [100 * r["test_acc_deterministic"] for r in rs], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy %, deterministic")
    ax.set_title("NoProp-CT: L2 weight x gradient clipping")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return "\n".join(lines) + f"\n\nPlot: `{out / 'curves.png'}`"


def probe(args: argparse.Namespace, name: str, images: int = 500) -> str:
    """Does the trained denoiser read z? Its accuracy at time t given z_t drawn from the true label and from a
    wrong one (y + 1), and how often it follows the wrong z; alpha_bar(0) of the learned schedule."""
    import torch

    from noprop.checkpoint import load_checkpoint
    from noprop.data import load_train_test

    torch.set_grad_enabled(False)
    model = load_checkpoint(folder(Path(args.out), name) / "checkpoint.pt").model().eval()
    _, test = load_train_test(args.dataset, root=args.data_root, subset=args.subset, seed=args.seed)
    x, y = test.x[:images], test.y[:images]
    W, features = model.embedding.weight, model.block.features(x)
    wrong = (y + 1) % W.shape[0]
    cells = []
    for t in (0.0, 0.5, 1.0):
        tt = torch.full((len(y),), t)
        g = torch.Generator().manual_seed(0)
        read = [model.block.logits(features, model.schedule.sample_marginal(W[label], tt, generator=g), t).argmax(1)
                for label in (y, wrong)]
        cells.append(f"{100 * (read[0] == y).float().mean():.1f} / {100 * (read[1] == y).float().mean():.1f}"
                     f" / {100 * (read[1] == wrong).float().mean():.1f}")
    ab0 = model.schedule.alpha_bar(torch.zeros(())).item()
    return f"| {name} | " + " | ".join(cells) + f" | {ab0:.3f} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="settings trained at once")
    p.add_argument("--out", default="bench/results/ct_stability")
    p.add_argument("--report", action="store_true", help="only print the table (and write the plot) from OUT")
    p.add_argument("--probe", action="store_true", help="also read each trained model: does it follow z?")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    if not args.report:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            ok = all(pool.map(lambda name: train(args, name), SETTINGS))
    print(report(out))
    if args.probe:
        print("\n% right given z from the true label / from a wrong one / following the wrong z (500 test images)\n")
        print("| setting | t = 0 | t = 0.5 | t = 1 | alpha_bar(0) |\n|---|---|---|---|---|")
        print("\n".join(probe(args, name) for name in SETTINGS if (folder(out, name) / "checkpoint.pt").exists()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
