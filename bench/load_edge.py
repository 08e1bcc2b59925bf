"""Load on the edge gRPC service (issue 6, item 7): `noprop-edge serve` under 16 concurrent clients.

    .venv/bin/python bench/load_edge.py --data-root /work/main/data          # train, export, serve, load
    .venv/bin/python bench/load_edge.py --report                              # markdown from the JSON

1. The model: --checkpoint, or one epoch of a small NoProp-DT (T=10, conv widths 16,32,64, batch 64) on a
   6000-image Fashion-MNIST subset trained by `noprop-train` (reused from --work if it is there), exported by
   `noprop-export` (fp32, deterministic).
2. `noprop-edge serve` as a real process on 127.0.0.1 (its default 4 request threads, 1 onnxruntime thread).
3. 16 client processes, each with its own channel (its own TCP connection), wait at a common start, then send
   20 000 Predict requests in all, batch 1, real Fashion-MNIST test images in turn, each request after the
   previous reply. Processes, not threads: like 16 devices, each has its own interpreter, so building requests
   and parsing replies do not queue on one GIL and bias the latencies the clients see.
4. The server's RSS (VmRSS) every 0.5 s from before the load to its end: start, peak, end and the slope over
   the last quarter of the load ("bounded": that slope is under --bounded-slope MB/min).

Results: --json (default bench/results/load/edge.json), with `uptime` before and after (other jobs share the
CPU), and the markdown table printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_common import MemorySampler, machine, percentile_ms, run_or_report, slope_mb_per_min, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=os.environ.get("NOPROP_DATA", str(ROOT / "data")))
    p.add_argument("--checkpoint", help="use this checkpoint instead of training one")
    p.add_argument("--work", default=str(ROOT / "runs" / "load-edge"), help="training run, model, images")
    p.add_argument("--subset", type=int, default=6000, help="training images of the one-epoch model")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=20000, help="Predict requests in all")
    p.add_argument("--workers", type=int, default=None, help="server request threads (default: serve's own)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--bounded-slope", type=float, default=1.0,
                   help="MB/min: RSS over the last quarter of the load growing slower than this counts as bounded")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "load" / "edge.json"))
    p.add_argument("--report", action="store_true", help="only print the markdown of --json")
    return p


def run_tool(argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$ " + " ".join(argv), file=sys.stderr, flush=True)
    res = subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env)
    if res.returncode != 0:
        raise SystemExit(f"{argv[0]} failed with exit code {res.returncode}")


def prepare_model(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint, model.onnx)."""
    work = Path(args.work)
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "train" / "checkpoint.pt"
    if not ckpt.exists():
        run_tool(["noprop-train", "--dataset", "fashion-mnist", "--data-root", args.data_root, "--subset",
                  str(args.subset), "--epochs", "1", "--T", "10", "--channels", "16,32,64", "--batch-size", "64",
                  "--threads", "1",
                  "--eval-mode", "deterministic", "--eval-limit", "2000", "--out", str(work / "train")])
    onnx_path = work / "model.onnx"
    if not onnx_path.exists() or onnx_path.stat().st_mtime < ckpt.stat().st_mtime:
        run_tool(["noprop-export", str(ckpt), "-o", str(onnx_path), "--threads", "1"])
    return ckpt, onnx_path


def test_images(args: argparse.Namespace, onnx_path: Path) -> tuple[Path, Path]:
    """Fashion-MNIST's 10 000 test images in raw scale [N, 1, 28, 28] and their labels, as .npy files."""
    from noprop.deploy.edge import EdgeModel
    from noprop.deploy.edge_data import load_eval_data

    work = Path(args.work)
    images, labels = work / "test-images.npy", work / "test-labels.npy"
    if not images.exists():
        x, y = load_eval_data(Path(args.data_root) / "FashionMNIST", EdgeModel(onnx_path, threads=1).info)
        np.save(images, x)
        np.save(labels, y)
    return images, labels


def start_server(onnx_path: Path, workers: int | None) -> tuple[subprocess.Popen, str, str]:
    cmd = [str(BIN / "noprop-edge"), "serve", str(onnx_path), "--port", "0", "--threads", "1"]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        proc.kill()
        raise SystemExit("noprop-edge serve did not start within 120 s") from None
    match = re.search(r"listening on (\S+:\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"unexpected first line of noprop-edge serve: {line!r}")
    print(line.strip(), file=sys.stderr, flush=True)
    return proc, match.group(1), line.strip()


def client(index: int, target: str, images: str, labels: str, first: int, count: int, ready, go, sent,
           results) -> None:
    """One device: its own channel, `count` batch-1 Predict calls one after another from image `first` on."""
    import grpc

    from noprop.proto import inference_pb2, inference_pb2_grpc

    x, y = np.load(images, mmap_mode="r"), np.load(labels)
    n = len(y)
    ids = [(first + i) % n for i in range(count)]
    requests = {i: inference_pb2.PredictRequest(shape=[1, *x.shape[1:]], pixels=x[i].ravel().tolist())
                for i in set(ids)}
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=120)
    latencies, errors, correct = [], Counter(), 0
    ready.put(index)
    go.wait()
    begin = time.perf_counter()
    for i in ids:
        start = time.perf_counter()
        try:
            reply = stub.Predict(requests[i], timeout=60)
        except grpc.RpcError as exc:
            errors[f"{exc.code().name}: {exc.details()}"] += 1
            continue
        finally:
            latencies.append(time.perf_counter() - start)
        correct += int(reply.predictions[0].label == y[i])
        if len(latencies) % 100 == 0:
            with sent.get_lock():
                sent.value += 100
    end = time.perf_counter()
    channel.close()
    results.put({"client": index, "latencies": latencies, "errors": dict(errors), "correct": correct,
                 "begin": begin, "end": end})


def run(args: argparse.Namespace) -> dict:
    before = uptime()
    ckpt, onnx_path = prepare_model(args)
    images, labels = test_images(args, onnx_path)
    server, target, server_line = start_server(onnx_path, args.workers)
    sampler = MemorySampler(server.pid, args.interval).start()
    try:
        ctx = mp.get_context("spawn")
        ready, go, sent, results = ctx.Queue(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
        per = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
        n_images = len(np.load(labels))
        procs = [ctx.Process(target=client, daemon=True,
                             args=(i, target, str(images), str(labels), i * n_images // args.clients, per[i], ready,
                                   go, sent, results)) for i in range(args.clients)]
        for p in procs:
            p.start()
        for _ in procs:  # every client has built its requests and connected before the start
            ready.get(timeout=300)
        time.sleep(3.0)  # a few idle samples: the server's RSS before the load
        print(f"{args.clients} clients, {args.requests} requests: go", file=sys.stderr, flush=True)
        load_start = sampler.mark("load_start")
        go.set()
        done = []
        while len(done) < args.clients:
            try:
                done.append(results.get(timeout=5))
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise SystemExit(f"client process(es) failed: exit codes {[p.exitcode for p in dead]}") \
                        from None
                print(f"  {sent.value} requests answered, {len(done)}/{args.clients} clients finished, server RSS "
                      f"{sampler.samples[-1][1]:.1f} MB", file=sys.stderr, flush=True)
        load_end = sampler.mark("load_end")
        for p in procs:
            p.join(10)
        time.sleep(2.0)
    finally:
        sampler.stop()
        server.send_signal(signal.SIGTERM)
        try:
            server_exit = server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server_exit = server.wait()
    after = uptime()

    latencies = np.concatenate([np.array(r["latencies"]) for r in done])
    errors = Counter()
    for r in done:
        errors.update(r["errors"])
    wall = max(r["end"] for r in done) - min(r["begin"] for r in done)
    t, rss = sampler.column(1)
    t_load, rss_load = sampler.column(1, load_start, load_end)
    idle = rss[t < load_start]
    quarter_start = load_start + 0.75 * (load_end - load_start)
    t_q, rss_q = sampler.column(1, quarter_start, load_end)
    slope = slope_mb_per_min(t_q, rss_q)
    ok = len(latencies) - sum(errors.values())
    from noprop.deploy.edge import EdgeModel

    info = EdgeModel(onnx_path, threads=1).info
    return {
        "checkpoint": str(ckpt), "model": str(onnx_path), "model_mb": round(onnx_path.stat().st_size / 1e6, 2),
        "model_summary": info.summary(), "training_metrics": info.training_metrics,
        "clients": args.clients, "requests": int(len(latencies)), "batch": 1,
        "server_workers": args.workers or "default (4)", "server_threads": 1,
        "errors": int(sum(errors.values())), "error_kinds": dict(errors),
        "served_accuracy": round(sum(r["correct"] for r in done) / max(1, ok), 4),
        "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 1),
        "latency_ms": {"p50": round(percentile_ms(latencies, 50), 2), "p99": round(percentile_ms(latencies, 99), 2),
                       "max": round(float(latencies.max()) * 1e3, 2), "mean": round(float(latencies.mean()) * 1e3, 2)},
        "server_rss_mb": {"idle": round(float(idle.mean()), 1) if len(idle) else None,
                          "start": round(float(rss_load[0]), 1), "peak": round(float(rss_load.max()), 1),
                          "end": round(float(rss_load[-1]), 1), "samples": int(len(rss_load)),
                          "last_quarter_slope_mb_per_min": round(slope, 3),
                          "bounded": bool(slope < args.bounded_slope),
                          "bounded_threshold_mb_per_min": args.bounded_slope},
        "server_exit_code": server_exit, "server_line": server_line,
        "rss_trace": [[round(a, 2), round(b, 2)] for a, b in zip(t - load_start, rss)],
        "machine": machine(), "uptime_before": before, "uptime_after": after,
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(r: dict) -> str:
    lat, mem = r["latency_ms"], r["server_rss_mb"]
    lines = [
        f"`noprop-edge serve` ({r['model_summary']}, {r['model_mb']} MB ONNX; request threads "
        f"{r['server_workers']}, 1 onnxruntime thread) under {r['clients']} client processes, one channel each, "
        f"{r['requests']} Predict requests of batch 1 (Fashion-MNIST test images), {r['date']}.",
        "",
        "| errors | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) | server RSS start / peak / end (MB) | "
        "RSS slope, last quarter (MB/min) | bounded |",
        "|---:|---:|---:|---:|---:|---|---:|---|",
        f"| {r['errors']} | {r['throughput_rps']:.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['max']:.1f} | "
        f"{mem['start']:.1f} / {mem['peak']:.1f} / {mem['end']:.1f} | {mem['last_quarter_slope_mb_per_min']:+.2f} | "
        f"{'yes' if mem['bounded'] else 'NO'} (< {mem['bounded_threshold_mb_per_min']} MB/min) |",
        "",
        f"Wall {r['wall_s']:.1f} s; served predictions {100 * r['served_accuracy']:.2f}% correct; idle RSS before "
        f"the load {mem['idle']} MB; {mem['samples']} RSS samples during the load; server exit code "
        f"{r['server_exit_code']} after SIGTERM. Machine: {r['machine']['cpu']}, {r['machine']['cpus']} CPUs; "
        f"`uptime` before: {r['uptime_before']}; after: {r['uptime_after']}.",
    ]
    if r["error_kinds"]:
        lines.append("Errors: " + "; ".join(f"{k} x{v}" for k, v in r["error_kinds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_or_report(build_parser().parse_args(argv), run, markdown, lambda result: result["errors"] == 0)


if __name__ == "__main__":
    sys.exit(main())
