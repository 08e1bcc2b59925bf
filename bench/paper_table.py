"""The structure of the paper's Table 1 on our data: every method x every class embedding, at one budget.

Rows: backprop, NoProp-DT, NoProp-CT, NoProp-CT as the paper's Eq. 9 has it (ct-eq9), NoProp-FM, adjoint,
each with one-hot, learned:20, prototype (the method's defaults) and prototype-paper (raw rows, conv z path)
embeddings. Columns: train and test accuracy, wall time per epoch, peak memory of training: the process's RSS
when training started (data loaded, model built) plus training's own peak above it (in brackets); the per-epoch
evaluation and checkpoint are left out by resetting the kernel's peak counter around them. Each cell trains in
a fresh process through noprop-train's run() (same data subset, epochs, seed and threads for all) and writes
OUT/<dataset>/<method>-<embedding>.json; cells already written are skipped, so an interrupted run resumes.
`--jobs N` trains N cells at once. Datasets other than Fashion-MNIST run only if their files are present
locally.

    .venv/bin/python bench/paper_table.py --subset 10000 --epochs 3 --threads 1
    .venv/bin/python bench/paper_table.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import peak_rss_kb, print_result, reset_peak_memory, rss_kb, run_child

# ct-eq9: NoProp-CT with the paper's Eq. 9 weight SNR'(t) and no gradient clipping (the defaults before issue 12)
METHODS = ("backprop", "dt", "ct", "ct-eq9", "fm", "adjoint")
VARIANTS = {"ct-eq9": ("ct", {"ct_l2_weight": "snr", "grad_clip": 0.0})}  # table row -> (method, its settings)
# prototype: the method's defaults (NoProp: rows scaled to unit mean norm, z read by the FC path; issue 12);
# prototype-paper: the paper's raw normalised images, z read by a conv path
EMBEDDINGS = ("one-hot", "learned:20", "prototype", "prototype-paper")
NAMES = {"backprop": "Backprop", "dt": "NoProp-DT", "ct": "NoProp-CT", "ct-eq9": "NoProp-CT, Eq. 9 weight, no clip",
         "fm": "NoProp-FM", "adjoint": "Adjoint"}
EMBEDDING_NAMES = {"one-hot": "one-hot", "learned:20": "dim=20", "prototype": "prototype",
                   "prototype-paper": "prototype, paper: raw rows, conv z path"}
CONTINUOUS = ("ct", "ct-eq9", "fm", "adjoint")


def cell_path(out: Path, dataset: str, method: str, embedding: str) -> Path:
    return out / dataset.replace(":", "_") / f"{method}-{embedding.replace(':', '')}.json"


def run_cell(args: argparse.Namespace) -> dict:
    """Inside the child: train one cell, then measure train accuracy and (continuous methods) accuracy per steps."""
    import torch

    from noprop.checkpoint import load_checkpoint
    from noprop.config import TrainConfig
    from noprop.data import load_train_test
    from noprop.io import read_jsonl
    from noprop.ops import train_cli
    from noprop.trainer import evaluate_accuracy

    torch.set_num_threads(args.threads)
    run_dir = cell_path(Path(args.out), args.dataset, args.method, args.embedding).with_suffix("")
    paper = args.embedding == "prototype-paper"
    embedding, scale, z_path = ("prototype", "image", "conv") if paper else (args.embedding, None, None)
    method, variant = VARIANTS.get(args.method, (args.method, {}))
    cfg = TrainConfig(method=method, embedding=embedding, prototype_scale=scale, prototype_z_path=z_path, **variant,
                      dataset=args.dataset, data_root=args.data_root,
                      epochs=args.epochs, subset=args.subset, eval_limit=args.eval_limit, seed=args.seed,
                      threads=args.threads, eval_mode="both", out=str(run_dir),
                      channels=tuple(int(c) for c in args.channels.split(",")),
                      steps=args.steps if args.method in CONTINUOUS else None).validate()
    rss_before = rss_kb()  # torch imported, data not yet loaded
    mem: dict = {"reset": True, "training_kb": 0, "train_cpu_s": 0.0}

    def on_event(name: str) -> None:
        # the peak is reset when training starts and after each epoch's evaluation and checkpoint, and read
        # when the epoch's training ends: training's own peak, above the RSS it started from
        # CPU seconds of training alone (1 thread): close to a quiet machine's wall time even when the
        # benchmark shares its cores, which the wall time is not
        if name in ("train_start", "epoch_done"):
            mem["cpu_start"] = time.process_time()
            mem["start_kb"] = rss_kb()
            mem["reset"] &= reset_peak_memory()
            mem.setdefault("rss_at_training_start_kb", mem["start_kb"])
        elif name == "epoch_trained":
            mem["train_cpu_s"] += time.process_time() - mem["cpu_start"]
            mem["training_kb"] = max(mem["training_kb"], peak_rss_kb() - mem["start_kb"])

    start = time.perf_counter()
    train_cli.run(cfg, on_event=on_event)
    wall = time.perf_counter() - start
    peak_kb = peak_rss_kb()  # whole process (a lower bound when the peak was reset: see training_kb)
    records = read_jsonl(run_dir / "metrics.jsonl")
    model = load_checkpoint(run_dir / "checkpoint.pt").model()
    train, test = load_train_test(args.dataset, root=args.data_root, subset=args.subset, seed=args.seed)
    if args.eval_limit:
        test = test.subset(range(min(args.eval_limit, len(test))))
    last = records[-1]
    result = {
        "dataset": args.dataset, "method": args.method, "embedding": args.embedding,
        "budget": {"epochs": args.epochs, "subset": args.subset, "threads": args.threads, "seed": args.seed,
                   "channels": args.channels,
                   "eval_limit": args.eval_limit, "steps": getattr(model.cfg, "steps", None),
                   "T": model.cfg.T},
        # the method's own settings as trained (defaults included): what a row was run with
        "settings": {k: v for k, v in cfg.to_dict().items()
                     if k in ("eta", "lr", "prototype_scale", "prototype_z_path", "ct_l2_weight", "grad_clip",
                              "solver", "fm_sigma")},
        "model_config": model.cfg.to_dict(),
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "train_acc": evaluate_accuracy(model, train, "deterministic", seed=args.seed),
        "test_acc_deterministic": last["test_acc_deterministic"],
        "test_acc_stochastic": last["test_acc_stochastic"],
        "train_s_per_epoch": sum(r["train_time_s"] for r in records) / len(records),
        "train_cpu_s_per_epoch": round(mem["train_cpu_s"] / len(records), 1),
        "wall_s": round(wall, 1),
        # training's own peak above the RSS it started each epoch from (data loaded, model built), and the
        # process's RSS then: their sum is the peak a process needs to train (evaluation and checkpoints excluded)
        "training_peak_above_start_mb": round(mem["training_kb"] / 1024, 1) if mem["reset"] else None,
        "rss_at_training_start_mb": round(mem["rss_at_training_start_kb"] / 1024, 1),
        "peak_rss_mb": round((mem["rss_at_training_start_kb"] + mem["training_kb"]) / 1024, 1) if mem["reset"]
        else round(peak_kb / 1024, 1),
        "rss_before_data_mb": round(rss_before / 1024, 1),
        "epochs": records,
    }
    if args.method in CONTINUOUS and args.sweep_steps:
        # accuracy against the number of integration steps, same trained weights
        result["test_acc_by_steps"] = {}
        for steps in (int(s) for s in args.sweep_steps.split(",")):
            gen = torch.Generator().manual_seed(args.seed)
            correct = sum(int((model.predict(x, "deterministic", gen, steps=steps) == y).sum())
                          for x, y in test.batches(500, shuffle=False))
            result["test_acc_by_steps"][str(steps)] = correct / len(test)
    return result


def available(dataset: str, data_root: str) -> bool:
    """Whether the dataset's files are on disk (nothing is downloaded)."""
    from noprop.data import load_dataset
    from noprop.sources import DatasetError

    try:
        load_dataset(dataset, "test", root=data_root, download=False)
    except DatasetError:
        return False
    return True


def report(out: Path, datasets: list[str], methods: list[str], embeddings: list[str]) -> str:
    blocks = []
    for dataset in datasets:
        cells = {(m, e): json.loads(p.read_text()) for m in methods for e in embeddings
                 if (p := cell_path(out, dataset, m, e)).exists()}
        if not cells:
            continue
        budgets = {json.dumps({k: v for k, v in c["budget"].items() if k not in ("steps", "T")}, sort_keys=True)
                   for c in cells.values()}
        any_cell = next(iter(cells.values()))["budget"]
        lines = [f"**{dataset}**: {any_cell['epochs']} epochs, "
                 f"{'all' if not any_cell['subset'] else any_cell['subset']} training examples, "
                 f"{any_cell['threads']} thread(s), seed {any_cell['seed']}, conv widths "
                 f"{any_cell.get('channels', '32,64,128')}"
                 + ("" if len(budgets) == 1 else " (WARNING: the cells' budgets differ)"),
                 "",
                 "| method | train % | test % det / sto | train s / epoch, wall (CPU) | peak RSS MB (training's own) "
                 "| test % by ODE steps |",
                 "|---|---|---|---|---|---|"]
        for m in methods:
            for e in embeddings:
                c = cells.get((m, e))
                if c is None:
                    continue
                by_steps = c.get("test_acc_by_steps") or {}
                steps = ", ".join(f"{k}: {100 * v:.1f}" for k, v in by_steps.items()) or "-"
                own = c.get("training_peak_above_start_mb")
                memory = f"{c['peak_rss_mb']:.0f}" + ("" if own is None else f" ({own:.0f})")
                lines.append(f"| {NAMES[m]} ({EMBEDDING_NAMES.get(e, e)}) | {100 * c['train_acc']:.2f} | "
                             f"{100 * c['test_acc_deterministic']:.2f} / {100 * c['test_acc_stochastic']:.2f} | "
                             f"{c['train_s_per_epoch']:.0f} ({c.get('train_cpu_s_per_epoch', float('nan')):.0f}) | "
                             f"{memory} | {steps} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else f"no results under {out}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion-mnist,mnist,cifar10",
                   help="comma list; those whose files are not present locally are skipped")
    p.add_argument("--data-root", default="data")
    p.add_argument("--subset", type=int, default=None, help="class-stratified training subset (same for all cells)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", default="32,64,128", help="conv widths of every method's block (default: full size)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps of ct / fm / adjoint (default: the method's)")
    p.add_argument("--sweep-steps", default="1,5,20,100", help="test accuracy at these step counts ('' for none)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--embeddings", default=",".join(EMBEDDINGS))
    p.add_argument("--out", default="bench/results/paper_table")
    p.add_argument("--force", action="store_true", help="re-run cells that already have a result")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once (each in its own process)")
    p.add_argument("--report", action="store_true", help="only print the markdown table from OUT")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--embedding", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    datasets, methods, embeddings = (args.datasets.split(","), args.methods.split(","), args.embeddings.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"paper_table: error: unknown method(s) {', '.join(unknown)}: use {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.one:
        print_result(run_cell(args))
        return 0
    if args.report:
        print(report(out, datasets, methods, embeddings))
        return 0

    cells = []
    for dataset in datasets:
        if not available(dataset, args.data_root):
            print(f"skipping {dataset}: its files are not under {args.data_root}", flush=True)
            continue
        for method in methods:
            for embedding in embeddings:
                path = cell_path(out, dataset, method, embedding)
                if path.exists() and not args.force:
                    print(f"done already: {path}", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--one", "--dataset", dataset, "--method", method,
                       "--embedding", embedding, "--data-root", args.data_root, "--epochs", str(args.epochs),
                       "--threads", str(args.threads), "--seed", str(args.seed), "--out", str(out),
                       "--sweep-steps", args.sweep_steps, "--channels", args.channels]
                for flag, value in (("--subset", args.subset), ("--eval-limit", args.eval_limit),
                                    ("--steps", args.steps)):
                    cmd += [flag, str(value)] if value else []
                cells.append((path, cmd, f"{dataset} {method} {embedding}"))

    def run_one(cell: tuple[Path, list[str], str]) -> bool:
        from noprop.io import atomic_write_text

        path, cmd, label = cell
        result = run_child(cmd, label)
        if result is not None:
            atomic_write_text(path, json.dumps(result, indent=2))
        return result is not None

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        failed = sum(not ok for ok in pool.map(run_one, cells))
    print(report(out, datasets, methods, embeddings))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
