"""Issue 26: NoProp-DT on the edge (full, anytime, streamed; fp32 and int8) against the CNN peer, in one run.

    .venv/bin/python bench/inference.py runs/dt/checkpoint.pt --peer runs/cnn/checkpoint.pt --data-root data
    (or: .venv/bin/python bench/edge_modes.py DT_CKPT CNN_CKPT --data-root data)

Everything is exported here (the dt chain with its block bundle, calibrated on the last 5000 test images; int8
dynamic and, for the before/after, static QDQ; the CNN fp32 and int8), then measured on the FIRST 5000 test images,
which the calibration never saw. onnxruntime on --threads threads (default 1), deterministic inference.

- batch 1: p50 / p95 / mean per call, the engines interleaved call by call (round r times every engine on image
  r), so that a loaded machine slows all of them alike: compare ratios, not milliseconds;
- images/s at batch 256 (streamed: block by block over all the images, each block loaded once), which also gives
  the accuracy; two interleaved passes, the faster kept;
- peak RSS (VmHWM) of a fresh process that loads the model and classifies --rss-images images in batches of 100
  (no torch in it), and the files' sizes;
- the load average before and after; a plot of accuracy against mean batch-1 latency.
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

from noprop.checkpoint import load_checkpoint
from noprop.data import load_dataset
from noprop.deploy.edge import BlockBundle, EdgeModel
from noprop.deploy.export_cli import export_checkpoint

CHILD = """
import json, sys, numpy as np
from noprop.deploy.edge import BlockBundle, EdgeModel, peak_rss_mb
x = np.load({images!r})
kind = {kind!r}
if kind == "full":
    labels = EdgeModel({path!r}, threads={threads}).run_batches(x, 100)[1]
else:
    b = BlockBundle({path!r}, threads={threads}, preload=kind == "anytime")
    rule = b.default_rule() if kind == "anytime" else None
    labels = b.run(x, rule, 100)[1] if kind == "streamed" else b.run_batches(x, 100, rule)[1]
assert not any(m.split(".")[0] == "torch" for m in sys.modules)
print(json.dumps({{"peak_rss_mb": peak_rss_mb(), "labels": labels.tolist()}}))
"""


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _calls(model, rule=None, streamed: bool = False) -> tuple:
    """(batch-1 call, batch-256 pass over an array) -> labels, for an EdgeModel or a BlockBundle."""
    if isinstance(model, EdgeModel):
        return (lambda x: model.run(x)[1]), (lambda x: model.run_batches(x, 256)[1])
    if streamed:
        return (lambda x: model.run(x, rule)[1]), (lambda x: model.run(x, rule, 256)[1])
    return (lambda x: model.run(x, rule)[1]), (lambda x: model.run_batches(x, 256, rule)[1])


def engines(paths: dict, threads: int) -> dict:
    """name -> (batch-1 callable, batch-256 pass over an array, kind, file for size and RSS)."""
    out = {}
    for name, path in (("cnn fp32", paths["cnn"]), ("cnn int8 (dynamic)", paths["cnn_int8"]),
                       ("dt full fp32", paths["dt"]), ("dt full int8 (dynamic)", paths["dt_int8"]),
                       ("dt full int8 (static QDQ, before)", paths["dt_qdq"])):
        out[name] = (*_calls(EdgeModel(path, threads=threads)), "full", path)
    for precision, bundle in (("fp32", paths["dt_bundle"]), ("int8", paths["dt_int8_bundle"])):
        b = BlockBundle(bundle, threads=threads)
        out[f"dt anytime {precision}"] = (*_calls(b, b.default_rule()), "anytime", bundle)
        if precision == "fp32":
            out["dt all blocks fp32 (runtime-driven, no exit)"] = (*_calls(b), "anytime-noexit", bundle)
        s = BlockBundle(bundle, threads=threads, preload=False)
        out[f"dt streamed {precision}"] = (*_calls(s, streamed=True), "streamed", bundle)
    return out


def child_rss(kind: str, path: Path, images: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = CHILD.format(kind=kind, path=str(path), images=images, threads=threads)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"child failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(dt_ckpt: str, cnn_ckpt: str, data_root: str | None, out_dir: Path, threads: int, runs: int,
        rss_images: int, holdout: int) -> dict:
    load_before = loadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(dt_ckpt)
    test = load_dataset(ckpt.data["name"], "test", root=data_root)
    n_eval = len(test) - min(holdout, len(test) // 2)
    view = (1, -1, 1, 1)
    raw = test.x[:n_eval].numpy() * np.array(test.std, dtype=np.float32).reshape(view) \
        + np.array(test.mean, dtype=np.float32).reshape(view)
    x, y = np.ascontiguousarray(raw, dtype=np.float32), test.y[:n_eval].numpy()

    print("exporting ...", file=sys.stderr, flush=True)
    dt = export_checkpoint(dt_ckpt, out_dir / "dt.onnx", blocks=True, holdout=holdout, data_root=data_root)
    dt8 = export_checkpoint(dt_ckpt, out_dir / "dt.int8.onnx", int8=True, blocks=True, holdout=holdout,
                            data_root=data_root)
    qdq = export_checkpoint(dt_ckpt, out_dir / "dt.qdq.onnx", int8=True, int8_scheme="static", data_root=data_root)
    cnn = export_checkpoint(cnn_ckpt, out_dir / "cnn.onnx")
    cnn8 = export_checkpoint(cnn_ckpt, out_dir / "cnn.int8.onnx", int8=True)
    paths = {"dt": dt.path, "dt_int8": dt8.path, "dt_qdq": qdq.path, "cnn": cnn.path, "cnn_int8": cnn8.path,
             "dt_bundle": dt.bundle, "dt_int8_bundle": dt8.bundle}
    table = engines(paths, threads)

    print(f"batch 1, {runs} interleaved rounds ...", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {k: [] for k in table}
    for i in range(10):  # warm-up
        for fn, *_ in table.values():
            fn(x[i][None])
    for r in range(runs):
        one = x[r % len(x)][None]
        for name, (fn, *_) in table.items():
            start = time.perf_counter()
            fn(one)
            times[name].append(time.perf_counter() - start)

    print("batch 256 ...", file=sys.stderr, flush=True)
    rate: dict[str, float] = {}
    acc: dict[str, float] = {}
    for _ in range(2):
        for name, (_, batch_fn, _, _) in table.items():
            start = time.perf_counter()
            labels = batch_fn(x)
            elapsed = time.perf_counter() - start
            rate[name] = max(rate.get(name, 0.0), len(x) / elapsed)
            acc[name] = float((labels == y).mean())

    print("peak RSS ...", file=sys.stderr, flush=True)
    rss = {}
    with tempfile.TemporaryDirectory(prefix="noprop-bench-") as tmp:
        images = str(Path(tmp) / "images.npy")
        np.save(images, x[:rss_images])
        for name, (_, _, kind, path) in table.items():
            if kind != "anytime-noexit":
                rss[name] = child_rss(kind, path, images, threads)["peak_rss_mb"]

    rows = {}
    for name, (_, _, _, path) in table.items():
        ms = np.array(times[name]) * 1e3
        rows[name] = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                      "mean_ms": float(ms.mean()), "images_per_s_b256": rate[name], "accuracy": acc[name],
                      "peak_rss_mb": rss.get(name), "file_mb": Path(path).stat().st_size / 1e6, "file": str(path)}
    full, any32, any8 = rows["dt full fp32"], rows["dt anytime fp32"], rows["dt anytime int8"]
    goals = {
        "anytime fp32: mean batch-1 latency / full fp32's (goal <= 0.3)": any32["mean_ms"] / full["mean_ms"],
        "anytime fp32: accuracy loss against full fp32, points (goal <= 0.5)":
            100 * (full["accuracy"] - any32["accuracy"]),
        "anytime int8: mean batch-1 latency / full fp32's": any8["mean_ms"] / full["mean_ms"],
        "streamed fp32: peak RSS - cnn fp32's, MB (goal <= 30)":
            rows["dt streamed fp32"]["peak_rss_mb"] - rows["cnn fp32"]["peak_rss_mb"],
        "streamed fp32: same labels as full fp32 (test set)": acc["dt streamed fp32"] == acc["dt full fp32"],
        "int8 dynamic full: p50 speed-up over fp32 (goal >= 2)":
            full["p50_ms"] / rows["dt full int8 (dynamic)"]["p50_ms"],
        "int8 static QDQ full: p50 speed-up over fp32 (before)":
            full["p50_ms"] / rows["dt full int8 (static QDQ, before)"]["p50_ms"],
        "int8 dynamic full: accuracy loss, points (goal <= 1)":
            100 * (full["accuracy"] - rows["dt full int8 (dynamic)"]["accuracy"]),
        "runtime-driven all blocks / one graph, p50": rows["dt all blocks fp32 (runtime-driven, no exit)"]["p50_ms"]
            / full["p50_ms"],
    }
    return {
        "dt_checkpoint": dt_ckpt, "cnn_checkpoint": cnn_ckpt, "dataset": ckpt.data["name"], "T": ckpt.config.T,
        "channels": list(ckpt.config.channels), "z_skip": bool(ckpt.config.z_skip),
        "eval_images": f"test[0:{n_eval}]", "calibration": dt.anytime, "calibration_int8": dt8.anytime,
        "threads": threads, "runs": runs, "rss_images": rss_images,
        "load_before": load_before, "load_after": loadavg(),
        "machine": {"cpu": _cpu(), "cpus": os.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__},
        "engines": rows, "goals": goals, "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _cpu() -> str:
    try:
        from benchlib import cpu_model

        return cpu_model()
    except Exception:
        return platform.processor() or "unknown"


def markdown(res: dict) -> str:
    lines = [
        f"NoProp-DT `{res['dt_checkpoint']}` (T={res['T']}, channels {res['channels']}, z-skip {res['z_skip']}) "
        f"against the CNN peer `{res['cnn_checkpoint']}`, {res['dataset']} {res['eval_images']} (the anytime "
        f"threshold was calibrated on the rest), onnxruntime {res['machine']['onnxruntime']}, {res['threads']} "
        f"thread(s), {res['machine']['cpu']} ({res['machine']['cpus']} CPUs); load average "
        f"{res['load_before']} before, {res['load_after']} after.",
        "",
        "| engine | batch 1 p50 (ms) | p95 (ms) | mean (ms) | images/s, batch 256 | peak RSS (MB) | file (MB) "
        "| accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["engines"].items():
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else ""
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['mean_ms']:.3f} | "
                     f"{r['images_per_s_b256']:.0f} | {rss} | {r['file_mb']:.2f} | {100 * r['accuracy']:.2f}% |")
    c = res["calibration"]
    lines += ["", f"Calibrated exit (fp32 bundle): {c['rule']} >= {c['threshold']:.6g}, {c['mean_blocks']:.2f} "
                  f"blocks per image, {100 * c['accuracy']:.2f}% against {100 * c['full_accuracy']:.2f}% on "
                  f"{c['examples']} held-out images; exits per block {c['rules'][c['rule']]['exits_per_block']}.",
              "", "| measure | value |", "|---|---:|"]
    for k, v in res["goals"].items():
        lines.append(f"| {k} | {v if isinstance(v, bool) else f'{v:.3f}'} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in res["engines"].items():
        ax.scatter(r["mean_ms"], 100 * r["accuracy"], s=30)
        ax.annotate(name, (r["mean_ms"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mean batch-1 latency (ms, log; loaded machine: compare positions, not values)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Edge inference, {res['dataset']} {res['eval_images']}, load {res['load_before']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dt_checkpoint")
    p.add_argument("cnn_checkpoint")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out-dir", default="runs/bench-edge-modes")
    p.add_argument("--json", default="bench/results/edge_modes.json")
    p.add_argument("--plot", default="bench/results/edge_modes.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--rss-images", type=int, default=1000)
    p.add_argument("--holdout", type=int, default=5000)
    args = p.parse_args(argv)
    res = run(args.dt_checkpoint, args.cnn_checkpoint, args.data_root, Path(args.out_dir), args.threads, args.runs,
              args.rss_images, args.holdout)
    table = markdown(res)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**res, "markdown": table}, indent=2, default=str) + "\n")
    plot(res, Path(args.plot))
    print(f"\nwrote {args.json} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
