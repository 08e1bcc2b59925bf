"""Edge inference benchmark: PyTorch eager vs onnxruntime fp32 vs onnxruntime int8, on one checkpoint.

    .venv/bin/python bench/inference.py runs/x/checkpoint.pt --data-root data [--threads 1] [--json out.json]

For each engine: latency per image at batch 1 (p50, p95 over --runs calls after a warm-up), images per second
at batch 256 (one pass over the test set, which also gives the accuracy), file size, and the peak RSS of a
fresh process that loads the model and classifies --rss-images test images (batches of 100): eager torch,
onnxruntime through noprop.deploy.edge (no torch in that process) with and without its CPU memory arena, and
a bare python + numpy process as the floor. All engines use the same thread count and deterministic
inference (z_0 = 0, eps = 0), on inputs in raw pixel scale (eager normalises inside the timed call too, as
the exported graph does). Prints a markdown table and writes everything as JSON.

    .venv/bin/python bench/inference.py runs/dt/checkpoint.pt --peer runs/cnn/checkpoint.pt --data-root data

With --peer (a --method cnn checkpoint): issue 26's comparison instead, NoProp-DT full / anytime / streamed, fp32
and int8, against the CNN peer's export, in one run (bench/edge_modes.py: table, JSON and a plot of accuracy
against latency).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from benchlib import cpu_model  # bench/ is on sys.path: this script runs from there

from noprop.checkpoint import load_checkpoint
from noprop.data import load_dataset
from noprop.deploy.edge import EdgeModel
from noprop.deploy.export_cli import export_checkpoint

RSS_BATCH = 100

# Peak RSS of the child itself: VmHWM of /proc/self/status belongs to the process image that execve made.
# (getrusage's ru_maxrss is no good here: Linux carries it over from the forking parent across execve.) Inline, not
# benchlib.peak_rss_kb: importing benchlib (psutil) would add to the floor this child measures.
PEAK = """
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

EAGER_CHILD = PEAK + """
import json, sys, numpy as np, torch
torch.set_num_threads({threads})
from noprop.checkpoint import load_checkpoint
ckpt = load_checkpoint({ckpt!r})
model = ckpt.model()
x = np.load({images!r})
mean = torch.tensor(ckpt.data["mean"]).view(1, -1, 1, 1); std = torch.tensor(ckpt.data["std"]).view(1, -1, 1, 1)
labels = []
with torch.inference_mode():
    for i in range(0, len(x), {batch}):
        labels.append(model((torch.from_numpy(x[i:i + {batch}]) - mean) / std).argmax(1).numpy())
print(json.dumps({{"maxrss_kb": peak_kb(),
                   "labels": np.concatenate(labels).tolist()}}))
"""

ORT_CHILD = PEAK + """
import json, sys, numpy as np
from noprop.deploy.edge import EdgeModel
model = EdgeModel({model!r}, threads={threads}, arena={arena})
x = np.load({images!r})
labels = model.run_batches(x, {batch})[1]
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
print(json.dumps({{"maxrss_kb": peak_kb(), "labels": labels.tolist()}}))
"""

FLOOR_CHILD = PEAK + """
import json, numpy as np
x = np.load({images!r})
print(json.dumps({{"maxrss_kb": peak_kb(), "labels": []}}))
"""


def latency(fn, x: np.ndarray, runs: int, warmup: int = 20) -> dict:
    """Per-call wall time at batch 1, in milliseconds."""
    for i in range(warmup):
        fn(x[i % len(x)][None])
    times = []
    for i in range(runs):
        one = x[i % len(x)][None]
        start = time.perf_counter()
        fn(one)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean())}


def throughput_and_accuracy(fn, x: np.ndarray, y: np.ndarray, batch: int = 256) -> dict:
    fn(x[:batch])  # warm-up
    labels = []
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        labels.append(fn(x[i:i + batch]))
    elapsed = time.perf_counter() - start
    pred = np.concatenate(labels)
    return {"images_per_s_b256": float(len(x) / elapsed), "accuracy": float((pred == y).mean())}


def child_rss(code: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"child failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.checkpoint)
    dataset = ckpt.data["name"]
    test = load_dataset(dataset, "test", root=args.data_root)
    if args.limit:
        test = test.subset(range(min(args.limit, len(test))))
    view = (1, -1, 1, 1)
    raw = (test.x * torch.tensor(test.std).view(view) + torch.tensor(test.mean).view(view)).numpy()
    raw = np.ascontiguousarray(raw, dtype=np.float32)
    y = test.y.numpy()

    start = time.perf_counter()
    fp32 = export_checkpoint(args.checkpoint, out_dir / "model.onnx")
    fp32_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = export_checkpoint(args.checkpoint, out_dir / "model.int8.onnx", int8=True, calibration=args.calibration,
                             data_root=args.data_root)
    int8_s = time.perf_counter() - start

    model = ckpt.model()
    mean, std = torch.tensor(ckpt.data["mean"]).view(view), torch.tensor(ckpt.data["std"]).view(view)

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model((torch.from_numpy(x) - mean) / std).argmax(1).numpy()

    engines = {"pytorch eager (fp32)": (eager, Path(args.checkpoint))}
    for name, path in (("onnxruntime fp32", fp32.path), ("onnxruntime int8", int8.path)):
        edge = EdgeModel(path, threads=args.threads)
        engines[name] = ((lambda m: lambda x: m.run(x)[1])(edge), path)

    rows = {}
    for name, (fn, path) in engines.items():
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        rows[name] = {"file": str(path), "file_mb": path.stat().st_size / 1e6,
                      **latency(fn, raw, args.runs), **throughput_and_accuracy(fn, raw, y)}

    with tempfile.TemporaryDirectory(prefix="noprop-bench-") as tmp:
        images = str(Path(tmp) / "images.npy")
        np.save(images, raw[:args.rss_images])
        fmt = {"threads": args.threads, "images": images, "batch": RSS_BATCH}
        rss = {
            "python + numpy only (floor)": child_rss(FLOOR_CHILD.format(**fmt)),
            "pytorch eager (fp32)": child_rss(EAGER_CHILD.format(ckpt=str(args.checkpoint), **fmt)),
        }
        for name, path in (("onnxruntime fp32", fp32.path), ("onnxruntime int8", int8.path)):
            for arena in (True, False):
                key = f"{name}, arena {'on' if arena else 'off'}"
                print(f"peak RSS {key} ...", file=sys.stderr, flush=True)
                rss[key] = child_rss(ORT_CHILD.format(model=str(path), arena=arena, **fmt))
    eager_labels = rss["pytorch eager (fp32)"]["labels"]
    rss_rows = {k: {"peak_rss_mb": v["maxrss_kb"] / 1024,
                    "agrees_with_eager": (v["labels"] == eager_labels) if v["labels"] else None}
                for k, v in rss.items()}

    eager_row, fp32_row, int8_row = (rows[k] for k in engines)
    eager_rss = rss_rows["pytorch eager (fp32)"]["peak_rss_mb"]
    edge_rss = min(v["peak_rss_mb"] for k, v in rss_rows.items() if k.startswith("onnxruntime fp32"))
    goals = {
        "ort fp32 >= 2x faster than eager at batch 1 (p50)": eager_row["p50_ms"] / fp32_row["p50_ms"],
        "edge process peak RSS <= 1/3 of eager's (fp32, best arena setting)": edge_rss / eager_rss,
        "int8 file <= 30% of fp32": int8.bytes / fp32.bytes,
        "int8 accuracy drop <= 1 point (points)": 100 * (fp32_row["accuracy"] - int8_row["accuracy"]),
    }
    return {
        "checkpoint": str(args.checkpoint), "dataset": dataset, "test_images": int(len(y)),
        "method": ckpt.method, "T": ckpt.config.T, "embedding": ckpt.config.embedding,
        "mode": "deterministic", "threads": args.threads, "latency_runs": args.runs,
        "rss_images": args.rss_images, "rss_batch": RSS_BATCH, "calibration_images": args.calibration,
        "export_s": {"fp32": fp32_s, "int8": int8_s},
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__},
        "engines": rows, "peak_rss": rss_rows, "goals": goals,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Checkpoint `{result['checkpoint']}` ({result['method']}, T={result['T']}, {result['embedding']}), "
        f"{result['dataset']} test set ({result['test_images']} images), deterministic inference, "
        f"{result['threads']} thread(s); {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, "
        f"torch {result['machine']['torch']}, onnxruntime {result['machine']['onnxruntime']}.",
        "",
        "| engine | batch 1 p50 (ms) | batch 1 p95 (ms) | images/s at batch 256 | file (MB) | test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["engines"].items():
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['images_per_s_b256']:.0f} | "
                     f"{r['file_mb']:.2f} | {100 * r['accuracy']:.2f}% |")
    lines += ["", f"Peak RSS of a fresh process that loads the model and classifies {result['rss_images']} images "
                  f"(batches of {result['rss_batch']}):", "",
              "| process | peak RSS (MB) | same labels as eager |", "|---|---:|---|"]
    for name, r in result["peak_rss"].items():
        agree = "" if r["agrees_with_eager"] is None else ("yes" if r["agrees_with_eager"] else "no")
        lines.append(f"| {name} | {r['peak_rss_mb']:.0f} | {agree} |")
    g = list(result["goals"].items())
    lines += ["", "| goal | measured |", "|---|---:|",
              f"| {g[0][0]} | {g[0][1]:.2f}x |", f"| {g[1][0]} | {g[1][1]:.2f} |",
              f"| {g[2][0]} | {100 * g[2][1]:.1f}% |", f"| {g[3][0]} | {g[3][1]:+.2f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-root", default=None, help="datasets folder (default: $NOPROP_DATA or ./data)")
    p.add_argument("--out-dir", default=None, help="where the .onnx files go (default: runs/bench-inference, with "
                   "--peer runs/bench-edge-modes)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/inference.json, with --peer "
                   "bench/results/edge_modes.json)")
    p.add_argument("--plot", default=None, help="with --peer: the accuracy/latency plot (default: "
                   "bench/results/edge_modes.png)")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime alike")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per engine")
    p.add_argument("--calibration", type=int, default=512, help="int8 calibration images")
    p.add_argument("--rss-images", type=int, default=1000)
    p.add_argument("--limit", type=int, help="use the first N test images only")
    p.add_argument("--peer", help="a --method cnn checkpoint: run bench/edge_modes.py's comparison against it")
    args = p.parse_args(argv)
    if args.peer:
        import edge_modes

        passed = {"--data-root": args.data_root, "--out-dir": args.out_dir, "--json": args.json, "--plot": args.plot,
                  "--rss-images": args.rss_images}
        return edge_modes.main([args.checkpoint, args.peer, "--threads", str(args.threads),
                                *(x for flag, value in passed.items() if value is not None
                                  for x in (flag, str(value)))])
    if args.plot:
        p.error("--plot needs --peer (the single-model benchmark draws no plot)")
    args.out_dir = args.out_dir or "runs/bench-inference"
    args.json = args.json or "bench/results/inference.json"
    result = run(args)
    table = markdown(result)
    print(table)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "markdown": table}, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
