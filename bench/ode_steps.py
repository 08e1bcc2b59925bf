"""Accuracy against the number of integration steps for NoProp-CT and NoProp-FM, on the tests' synthetic task.

Trains each method once (small blocks; a harder variant of tests/synthetic.py: 8 classes, 2-row bands in 16x16 images),
then evaluates the same weights with 1..100 steps, deterministic and stochastic (mean of 3 noise seeds).
This is what the default --steps of ct / fm was chosen from.

    .venv/bin/python bench/ode_steps.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import synthetic_data  # noqa: E402

from noprop.io import atomic_write_text  # noqa: E402
from noprop.methods import build_model, make_optimizer  # noqa: E402
from noprop.model_configs import (
    CTConfig,  # noqa: E402
    FMConfig,  # noqa: E402
)
from noprop.trainer import train_end_to_end_epoch  # noqa: E402

STEPS = (1, 2, 5, 10, 20, 50, 100)


def accuracy(model, data, mode: str, steps: int, seeds: int) -> float:
    accs = []
    for seed in range(seeds if mode == "stochastic" else 1):
        pred = model.predict(data.x, mode, torch.Generator().manual_seed(seed), steps=steps)
        accs.append((pred == data.y).float().mean().item())
    return sum(accs) / len(accs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ct:one-hot,ct:learned:20,fm:one-hot,fm:learned:20")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--out", default="bench/results/ode_steps.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    kw = {"num_classes": args.classes, "size": 16}
    train, test = synthetic_data(args.train, seed=1, **kw), synthetic_data(1000, seed=2, **kw)
    results = {}
    for spec in args.methods.split(","):
        method, embedding = spec.split(":", 1)
        torch.manual_seed(0)
        cls = {"ct": CTConfig, "fm": FMConfig}[method]
        cfg = cls(input_shape=(1, 16, 16), num_classes=args.classes, embedding=embedding, channels=(8, 16, 16),
                  hidden=64, dropout=0.0)
        model = build_model(method, cfg)
        opt = make_optimizer(method, model.parameters(), 1e-3, 1e-3)
        start = time.perf_counter()
        for _ in range(args.epochs):
            train_end_to_end_epoch(model, opt, train, 64, generator=torch.Generator().manual_seed(0))
        row = {"train_s": round(time.perf_counter() - start, 1)}
        for steps in STEPS:
            row[str(steps)] = {m: round(accuracy(model, test, m, steps, 3), 4) for m in ("deterministic", "stochastic")}
        results[spec] = row
        print(spec, json.dumps(row), flush=True)
    atomic_write_text(args.out, json.dumps({"args": vars(args), "results": results}, indent=2))
    print("| method | " + " | ".join(f"{s} steps det / sto" for s in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for spec, row in results.items():
        cells = " | ".join(f"{100 * row[str(s)]['deterministic']:.1f} / {100 * row[str(s)]['stochastic']:.1f}"
                           for s in STEPS)
        print(f"| {spec} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
