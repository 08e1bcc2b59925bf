"""Continuous methods on the edge: accuracy, file size and latency against the number of unrolled ODE steps.

Trains NoProp-CT (one-hot and learned:20) and NoProp-FM for one epoch on a Fashion-MNIST subset with
noprop-train (one process each), then exports each checkpoint with noprop-export at every step count of
--steps and runs the .onnx files in onnxruntime through noprop.deploy.edge: test accuracy (deterministic, raw
IDX test images), file size, export time and batch-1 latency (min / p50 / p95 over --runs single-image calls
after a warm-up, --threads threads), and
the same for the int8 file of noprop-export --int8. The PyTorch model is evaluated at the same step counts as
a check (label agreement with the ONNX file).

    .venv/bin/python bench/export_steps.py --data-root data --subset 6000 --channels 16,32,64 --eval-limit 2000
    .venv/bin/python bench/export_steps.py --report     # the table again, from OUT/results.json

Writes OUT/results.json (default bench/results/export_steps), OUT/accuracy_vs_steps.png and the run folders
OUT/<variant>/ of noprop-train (checkpoints and .onnx files are not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("ct", "ct:learned:20", "fm")  # method[:embedding]; one-hot when no embedding is given


def variant_name(variant: str) -> str:
    return variant.replace(":", "-").replace("-learned-", "-learned")


def train(variant: str, args: argparse.Namespace, out: Path) -> Path:
    """One epoch of noprop-train in its own process; returns the checkpoint."""
    method, _, embedding = variant.partition(":")
    run = out / variant_name(variant)
    ckpt = run / "checkpoint.pt"
    if args.reuse and ckpt.is_file():
        print(f"== {variant}: reusing {ckpt}", flush=True)
        return ckpt
    cmd = [sys.executable, "-m", "noprop.ops.train_cli", "--method", method, "--dataset", args.dataset,
           "--data-root", args.data_root, "--subset", str(args.subset), "--epochs", "1",
           "--channels", args.channels, "--eval-limit", str(args.eval_limit), "--threads", str(args.threads),
           "--seed", str(args.seed), "--out", str(run), "--embedding", embedding or "one-hot"]
    print(f"== {variant}: noprop-train {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True)
    return ckpt


def latency_ms(model, image: np.ndarray, runs: int) -> tuple[float, float, float]:
    """min, p50 and p95 of single-image calls, after 10 warm-up calls (min: the least disturbed by other load)."""
    for _ in range(10):
        model.run(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(image)
        times.append(time.perf_counter() - start)
    return float(np.min(times) * 1e3), float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def measure(variant: str, ckpt_path: Path, args: argparse.Namespace) -> dict:
    import torch

    from noprop.checkpoint import load_checkpoint
    from noprop.deploy.edge import EdgeModel
    from noprop.deploy.edge_data import load_eval_data
    from noprop.deploy.export_cli import export_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model()
    name = variant_name(variant)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-steps-") as tmp:
        x = y = None
        for steps in args.steps:
            start = time.perf_counter()
            result = export_checkpoint(ckpt_path, Path(tmp) / f"{name}-{steps}.onnx", steps=steps,
                                       write_manifest=False)
            export_s = time.perf_counter() - start
            edge = EdgeModel(result.path, threads=args.threads)
            if x is None:
                x, y = load_eval_data(Path(args.data_root) / args.idx, edge.info, limit=args.eval_limit)
            labels = edge.run_batches(x, 256)[1]
            mean = torch.tensor(ckpt.data["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(ckpt.data["std"]).view(1, -1, 1, 1)
            with torch.no_grad():
                torch_labels = torch.cat([model.predict((torch.from_numpy(x[i:i + 500]) - mean) / std, steps=steps)
                                          for i in range(0, len(x), 500)]).numpy()
            fastest, p50, p95 = latency_ms(edge, x[:1], args.runs)
            int8 = {}
            if args.calibration:
                q = export_checkpoint(ckpt_path, Path(tmp) / f"{name}-{steps}.int8.onnx", steps=steps, int8=True,
                                      calibration=args.calibration, data_root=args.data_root, write_manifest=False)
                q_edge = EdgeModel(q.path, threads=args.threads)
                _, q50, _ = latency_ms(q_edge, x[:1], args.runs)
                int8 = {"int8_bytes": q.bytes, "int8_accuracy": float((q_edge.run_batches(x, 256)[1] == y).mean()),
                        "int8_latency_ms_p50": round(q50, 3)}
            row = {"steps": steps, "accuracy": float((labels == y).mean()),
                   "torch_accuracy": float((torch_labels == y).mean()),
                   "label_agreement": float((torch_labels == labels).mean()),
                   "bytes": result.bytes, "nodes": _node_count(result.path), "export_s": round(export_s, 2),
                   "latency_ms_min": round(fastest, 3), "latency_ms_p50": round(p50, 3),
                   "latency_ms_p95": round(p95, 3), **int8}
            rows.append(row)
            print(f"{name} steps {steps:>3}: accuracy {100 * row['accuracy']:.2f}% (torch "
                  f"{100 * row['torch_accuracy']:.2f}%, agreement {100 * row['label_agreement']:.2f}%), "
                  f"{row['bytes'] / 1e6:.2f} MB, {row['nodes']} nodes, batch-1 p50 {p50:.2f} ms, "
                  f"export {export_s:.1f} s" + (f"; int8 {100 * int8['int8_accuracy']:.2f}%, "
                                                 f"{int8['int8_bytes'] / 1e6:.2f} MB, p50 "
                                                 f"{int8['int8_latency_ms_p50']:.2f} ms" if int8 else ""), flush=True)
    metrics = json.loads((ckpt_path.parent / "metrics.jsonl").read_text().splitlines()[-1])
    return {"method": name, "embedding": ckpt.config.embedding, "configured_steps": ckpt.config.steps,
            "train_metrics": metrics, "parameters": sum(p.numel() for p in model.parameters()),
            "examples": int(len(y)), "rows": rows}


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path)).graph.node)


def table(results: dict) -> str:
    lines = []
    for res in results["methods"]:
        m = res["train_metrics"]
        lines += [f"**{res['method']}** ({res['parameters'] / 1e6:.2f} M parameters, 1 epoch: train "
                  f"{m['train_time_s']:.0f} s, test accuracy at the configured {res['configured_steps']} steps "
                  f"{100 * m['test_acc_deterministic']:.2f}% in noprop-train's evaluation)", "",
                  "| steps | accuracy (ONNX) | accuracy (PyTorch) | label agreement | file MB | nodes | "
                  "batch-1 min / p50 / p95 ms | export s | int8 accuracy | int8 MB | int8 batch-1 p50 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            q = (f"{100 * r['int8_accuracy']:.2f}% | {r['int8_bytes'] / 1e6:.2f} | {r['int8_latency_ms_p50']:.2f}"
                 if "int8_bytes" in r else "- | - | -")
            lines.append(f"| {r['steps']} | {100 * r['accuracy']:.2f}% | {100 * r['torch_accuracy']:.2f}% | "
                         f"{100 * r['label_agreement']:.2f}% | {r['bytes'] / 1e6:.2f} | {r['nodes']} | "
                         f"{r.get('latency_ms_min', float('nan')):.2f} / {r['latency_ms_p50']:.2f} / "
                         f"{r['latency_ms_p95']:.2f} | {r['export_s']:.1f} | {q} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from noprop.plots import plt, save_figure

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for res in results["methods"]:
        steps = [r["steps"] for r in res["rows"]]
        ax.plot(steps, [100 * r["accuracy"] for r in res["rows"]], marker="o", label=res["method"])
        ax2.plot(steps, [r["latency_ms_min"] for r in res["rows"]], marker="o", label=res["method"])
    for a, label in ((ax, "test accuracy (%)"), (ax2, "batch-1 latency, fastest of the runs (ms)")):
        a.set_xscale("log")
        a.set_xlabel("unrolled steps")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
        a.legend()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--idx", default="FashionMNIST/raw", help="folder of the IDX test files under --data-root")
    p.add_argument("--subset", type=int, default=6000, help="training examples (class-stratified)")
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--eval-limit", type=int, default=2000, help="test images")
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--variants", default=",".join(VARIANTS), help="method[:embedding], comma-separated")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per step count")
    p.add_argument("--calibration", type=int, default=256, help="int8: calibration images (0: no int8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse OUT/<variant>/checkpoint.pt when present")
    p.add_argument("--out", default="bench/results/export_steps")
    p.add_argument("--report", action="store_true", help="only print the table and redraw the plot")
    args = p.parse_args()
    out = Path(args.out)
    if args.report:
        results = json.loads((out / "results.json").read_text())
        print(table(results))
        plot(results, out / "accuracy_vs_steps.png")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"settings": {k: v for k, v in vars(args).items() if k != "report"},
               "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
               "methods": []}
    for variant in args.variants.split(","):
        ckpt = train(variant, args, out)
        results["methods"].append(measure(variant, ckpt, args))
        results["wall_s"] = round(time.perf_counter() - start, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    import onnxruntime
    import torch

    results["machine"].update(torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    plot(results, out / "accuracy_vs_steps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
