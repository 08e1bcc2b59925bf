"""noprop-edge: run an exported NoProp model on a device with onnxruntime and numpy alone.

The command line of the edge runtime (deploy/edge.py, whose docstring describes the model file). It imports
numpy and onnxruntime, nothing else at import time: never torch, never the rest of noprop. Pillow is imported
lazily to read image files (deploy/edge_data.py), and the generated modules of noprop.proto (with protobuf) for
`info --json`. So `predict`, `eval` and `info` also work from edge.py, edge_data.py and this file copied alone onto
a device (`python edge_cli.py predict model.onnx img.png`). `serve` and `query` need grpcio and noprop.proto
anyway: they live in noprop.deploy.edge_service and noprop.deploy.edge_client, imported only when they run.

    noprop-edge info model.onnx
    noprop-edge predict model.onnx a.png b.png [--resize] [--convert] [--json]
    noprop-edge eval model.onnx --data test.npz|DIR [--limit N] [--batch-size B]
    noprop-edge eval|predict model.onnx ... --mode full|anytime|streamed [--threshold P [--rule R] | --exit-after K]
    noprop-edge serve model.onnx [--host 127.0.0.1] [--port 50051] [--max-request-bytes B]
    noprop-edge query HOST:PORT a.png [--info] [--health]

Stochastic models: --seed N repeats a run; without it each run draws a fresh seed and reports it (a "seed" in
JSON output, a note on stderr; `serve` in PredictResponse.seed).

Exit codes: 0 success; 2 bad input (missing, corrupt or truncated model, an image of the wrong size or channel
count, unreadable data, bad usage), with a one-line message on stderr; 1 a failed remote call (query);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    from noprop.deploy import edge, edge_data
except ImportError as exc:  # edge.py and edge_data.py copied beside this file onto a device, without the package
    import edge
    import edge_data

    _WITHOUT_PACKAGE = edge.one_line(exc)  # why serve and query cannot run here
else:
    _WITHOUT_PACKAGE = ""

RUN_MODES = ("full", "anytime", "streamed")  # --mode of predict / eval
SEED_LIMIT = 2**64  # --seed and PredictRequest.seed (uint64): 0 .. 2**64 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is outside 0 .. 2**64 - 1")
    return value


def _image_file(text: str) -> str:
    """predict's and query's images: a folder is a usage error that says what to pass instead."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: pass image files (PNG, JPEG, ...) or .npy arrays, e.g. "
                                         f"{text.rstrip('/')}/*.png; for a folder of class folders use noprop-edge "
                                         f"eval MODEL --data {text}")
    return text


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]: a probability or margin threshold")
    return value


def _exit_rule(args: argparse.Namespace, bundle: edge.BlockBundle) -> edge.ExitRule | None:
    """The exit rule of --mode anytime / streamed: --exit-after, --threshold (with --rule or the calibrated rule),
    or the bundle's calibrated rule (anytime only); streamed runs the full chain unless told otherwise."""
    if args.exit_after is not None:
        if args.threshold is not None:
            raise edge.EdgeError("--exit-after and --threshold are two exit rules: give one")
        if not 1 <= args.exit_after <= bundle.T:
            raise edge.EdgeError(f"--exit-after must be in 1 .. {bundle.T} (the model's blocks), got {args.exit_after}")
        return edge.ExitRule("blocks", blocks=args.exit_after)
    if args.threshold is not None:
        calibrated = bundle.default_rule()
        return edge.ExitRule(args.rule or (calibrated.rule if calibrated else "confidence"), args.threshold)
    if args.rule is not None:
        raise edge.EdgeError("--rule needs --threshold (the calibrated rule comes with its own threshold)")
    if args.mode == "streamed":
        return None
    rule = bundle.default_rule()
    if rule is None:
        raise edge.EdgeError(f"{bundle.path} records no exit calibration: pass --threshold P or --exit-after K, or "
                        "export again with noprop-export --blocks (which calibrates on held-out images)")
    return rule


def _open_model(args: argparse.Namespace) -> edge.EdgeModel | edge.BlockBundle:
    """The one-graph model (--mode full on an .onnx) or the block bundle (anytime, streamed, or a bundle given)."""
    path = Path(args.model)
    if args.mode == "full" and (args.threshold is not None or args.exit_after is not None or args.rule):
        raise edge.EdgeError("--threshold, --rule and --exit-after need --mode anytime or streamed")
    given_bundle = path.is_file() and path.suffix == ".zip"
    if args.mode == "full" and not given_bundle and not args.bundle:
        return edge.EdgeModel(path, threads=args.threads, arena=not args.no_arena)
    bundle = Path(args.bundle) if args.bundle else path if given_bundle else edge.bundle_path_for(path)
    if not bundle.is_file():
        raise edge.EdgeError(f"--mode {args.mode} needs the block bundle {bundle}, which does not exist: export the "
                        "checkpoint with noprop-export --blocks (NoProp-DT), or pass --bundle")
    return edge.BlockBundle(bundle, threads=args.threads, arena=not args.no_arena, preload=args.mode != "streamed")


def _format_info(model: edge.EdgeModel) -> str:
    info = model.info
    lines = [f"{model.path}  ({model.size / 1e6:.2f} MB, sha256 {model.sha256[:16]}...)"]
    manifest = edge.manifest_path_for(model.path)
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("file_sha256", "")
            state = "matches" if recorded == model.sha256 else "DOES NOT MATCH this file"
        except (OSError, ValueError):
            state = "unreadable"
        lines.append(f"  manifest      {manifest.name} ({state})")
    sched = ", ".join(f"{k}={_brief(v)}" for k, v in info.schedule.items() if v is not None)
    length = f"{info.steps} unrolled {info.solver} steps (T={info.T})" if info.steps else f"T={info.T}"
    metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in info.training_metrics.items() if not isinstance(v, dict))
    shape = ", ".join(map(str, info.input_shape))
    rows = [
        ("format", f"{edge.FORMAT} v{edge.FORMAT_VERSION}, noprop-fl {info.noprop_fl_version}, {info.exporter}, "
                   f"opset {info.opset}"),
        ("method", f"{info.method}, {length}, embedding {info.embedding} (d={info.embedding_dim}), head {info.head}"),
        ("schedule", sched),
        ("mode", info.mode + ("  (input noise float32 [T+1, N, d] = "
                              f"[{info.T + 1}, N, {info.embedding_dim}])" if info.mode == "stochastic" else "")),
        ("precision", info.precision + (f"  {json.dumps(info.quantization)}" if info.quantization else "")),
        ("input", f"image float32 [N, {shape}] ({info.input_layout}), raw scale {info.input_scale}"),
        ("normalisation", f"{'inside the graph' if info.normalised_in_graph else 'by the caller'}: "
                          f"mean {[round(v, 4) for v in info.mean]}, std {[round(v, 4) for v in info.std]}"),
        ("outputs", f"probabilities float32 [N, {info.num_classes}], label int64 [N]"),
        ("classes", ", ".join(f"{i} {c}" for i, c in enumerate(info.class_names))),
        ("dataset", info.dataset),
        ("training", metrics),
    ]
    lines += [f"  {k:<13} {v}" for k, v in rows]
    return "\n".join(lines)


def _brief(value: object) -> str:
    """A schedule value for `info`: long lists (ct's alpha_bar at every step time) as first .. last."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{value[0]:.4g} .. {value[-1]:.4g}] ({len(value)} values)"
    return str(value)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``noprop-edge: error: ...``, exit 2), not usage + error.
    (noprop.ops.cli has the same class; this file runs as a loose copy beside edge.py, without the noprop package.)"""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


EPILOG = """Examples:
  noprop-edge info model.onnx
  noprop-edge predict model.onnx shoe.png bag.png
  noprop-edge eval model.onnx --data test.npz
  noprop-edge serve model.onnx --port 50051
  noprop-edge query 127.0.0.1:50051 shoe.png --health
Each command's own options: noprop-edge COMMAND --help."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="noprop-edge", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", metavar="MODEL", help="the .onnx file noprop-export wrote")
        sp.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: its own "
                                                                  "choice)")
        sp.add_argument("--no-arena", action="store_true", help="disable onnxruntime's CPU memory arena (default: "
                                                                "the arena is used)")

    def image_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--resize", action="store_true", help="scale images of another size to the model's "
                                                              "(default: another size is an error)")
        sp.add_argument("--convert", action="store_true", help="convert grayscale <-> RGB to the model's channels "
                                                               "(default: other channels are an error)")
        sp.add_argument("--seed", type=_seed, metavar="N",
                        help="seed of a stochastic model's noise (default: a fresh one, printed so the run can be "
                             "repeated)")

    sp = sub.add_parser("info", help="show the model's metadata")
    model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON (default: text)")

    def mode_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mode", choices=RUN_MODES, default="full",
                        help="full (the one-graph model), anytime (the block bundle beside the model, leaving the "
                             "chain once the blocks so far are sure enough: its calibrated rule unless --threshold or "
                             "--exit-after) or streamed (one block in memory at a time; the full model's answers) "
                             "(default: full)")
        sp.add_argument("--bundle", metavar="FILE",
                        help="the block bundle (default: model.blocks.zip beside model.onnx)")
        sp.add_argument("--threshold", type=_unit_interval, metavar="P",
                        help="anytime / streamed: leave after block t once its score is at least P, in (0, 1]")
        sp.add_argument("--rule", choices=edge.EXIT_RULES,
                        help="the score --threshold applies to: max p_t (confidence) or its top-1 minus top-2 "
                             "(margin); default: the calibrated rule, else confidence")
        sp.add_argument("--exit-after", type=int, metavar="K", help="anytime / streamed: stop after K blocks "
                                                                     "(default: all of them)")

    sp = sub.add_parser("predict", help="label and class name per image")
    model_args(sp)
    sp.add_argument("images", nargs="+", type=_image_file, metavar="IMAGE",
                    help="image files (PNG, JPEG, ...) or .npy arrays")
    image_args(sp)
    mode_args(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per image (default: a line of text)")

    sp = sub.add_parser("eval", help="accuracy and images per second on labelled data")
    model_args(sp)
    sp.add_argument("--data", required=True, metavar="FILE|DIR",
                    help="FILE.npz (x_test, y_test or x, y), a DIR of class folders, or a DIR with MNIST-style IDX "
                         "test files")
    sp.add_argument("--limit", type=int, metavar="N", help="use the first N examples only (default: all)")
    sp.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per run (default: 256)")
    image_args(sp)
    mode_args(sp)
    sp.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")

    sp = sub.add_parser("serve", help="gRPC inference service (noprop.v1.Inference + grpc.health.v1)")
    model_args(sp)
    sp.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                    help="address to bind (default: 127.0.0.1, this machine only)")
    sp.add_argument("--port", type=int, default=edge.DEFAULT_PORT, metavar="PORT",
                    help=f"port (default: {edge.DEFAULT_PORT}; 0 = any free)")
    sp.add_argument("--max-request-bytes", type=int, default=edge.DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                    help="larger requests get RESOURCE_EXHAUSTED (default: 4 MiB)")
    sp.add_argument("--workers", type=int, default=4, metavar="N", help="request threads (default: 4)")
    sp.add_argument("--max-concurrent", type=int, default=edge.DEFAULT_MAX_CONCURRENT, metavar="N",
                    help=f"calls in progress or queued; more get RESOURCE_EXHAUSTED (default: "
                         f"{edge.DEFAULT_MAX_CONCURRENT})")
    sp.add_argument("--grace", type=float, default=5.0, metavar="S",
                    help="seconds calls in flight get at shutdown (default: 5)")
    sp.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve over TLS (default: no TLS)")
    sp.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    sp.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --host without TLS (default: refused)")

    sp = sub.add_parser("query", help="call a running noprop-edge serve")
    sp.add_argument("target", metavar="HOST:PORT", help="the address noprop-edge serve listens on")
    sp.add_argument("images", nargs="*", type=_image_file, metavar="IMAGE",
                    help="image files or .npy arrays to classify")
    sp.add_argument("--info", action="store_true", help="print the served model's manifest")
    sp.add_argument("--health", action="store_true", help="check the standard health service")
    sp.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="seconds to wait for an answer (default: 10)")
    sp.add_argument("--tls-ca", metavar="FILE",
                    help="PEM CA certificate of a server started with --tls-cert: use TLS (default: no TLS)")
    image_args(sp)
    sp.add_argument("--json", action="store_true", help="print the answers as JSON (default: text)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "query":
        from noprop.deploy.edge_client import query_command

        return query_command(args)
    if args.threads is not None and args.threads < 1:
        raise edge.EdgeError("--threads must be at least 1")
    if args.command == "serve":
        from noprop.deploy.edge_service import serve_command

        return serve_command(args)
    if args.command == "info":
        if Path(args.model).suffix == ".zip":
            bundle = edge.BlockBundle(args.model, preload=False)
            print(json.dumps({k: v for k, v in bundle.manifest.items() if k != "metadata"}, indent=2) if args.json
                  else f"{bundle.path}  ({bundle.size / 1e6:.2f} MB block bundle of {bundle.T} blocks, "
                       f"read out by the {bundle.readout})\n  "
                       f"{bundle.info.summary()}\n  anytime       "
                       + (json.dumps({k: v for k, v in bundle.calibration.items() if k != "rules"})
                          if bundle.calibration else "not calibrated"))
            return 0
        model = edge.EdgeModel(args.model, threads=args.threads, arena=not args.no_arena)
        if args.json:
            print(edge.manifest_json(model.info, model.path), end="")
        else:
            print(_format_info(model))
        return 0
    if args.command == "eval" and args.batch_size < 1:
        raise edge.EdgeError("--batch-size must be at least 1")
    model = _open_model(args)
    rule = _exit_rule(args, model) if isinstance(model, edge.BlockBundle) else None
    if args.command == "predict":
        x = edge_data.load_images(args.images, model.info.input_shape, args.resize, args.convert)
        extra: list[dict] = [{} for _ in args.images]
        if isinstance(model, edge.BlockBundle):
            probs, labels, used = model.run(x, rule)
            extra = [{"blocks": int(u)} for u in used]
            seed = None
        else:
            seed = _resolve_seed(model, args.seed)
            probs, labels = model.run(x, rng=np.random.default_rng(seed))
        edge_data.print_predictions([{"file": f, "label": int(lab), "class": model.info.class_names[int(lab)],
                             "probability": float(p[lab]), **e}
                            for f, p, lab, e in zip(args.images, probs, labels, extra, strict=True)], args.json,
                           seed, drawn=args.seed is None)
        return 0
    if args.command == "eval":
        x, y = edge_data.load_eval_data(args.data, model.info, args.limit, args.resize, args.convert)
        extra = {}
        if isinstance(model, edge.BlockBundle):
            seed = None
            if args.mode == "anytime":
                model.run(x[: min(len(x), args.batch_size)], rule)  # warm-up, as for the one-graph model
            start = time.perf_counter()
            if args.mode == "streamed":  # block by block over all the data: each block is loaded once
                _, labels, used = model.run(x, rule, args.batch_size)
            else:
                _, labels, used = model.run_batches(x, args.batch_size, rule)
            elapsed = time.perf_counter() - start
            extra = {"exit_rule": rule.describe() if rule else "none (all blocks)",
                     "mean_blocks": float(used.mean()), "bundle": str(model.path)}
        else:
            seed = _resolve_seed(model, args.seed)
            model.run(x[: min(len(x), args.batch_size)])  # warm-up: first-run allocations are not throughput
            start = time.perf_counter()
            _, labels = model.run_batches(x, args.batch_size, seed or 0)
            elapsed = time.perf_counter() - start
        result = {"model": str(model.path), "data": str(args.data), "examples": int(len(y)),
                  "correct": int((labels == y).sum()), "accuracy": float((labels == y).mean()),
                  "seconds": elapsed, "images_per_s": float(len(y) / elapsed), "batch_size": args.batch_size,
                  "mode": model.info.mode, "run_mode": args.mode, "precision": model.info.precision, "seed": seed,
                  **extra, "peak_rss_mb": edge.peak_rss_mb()}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            noise = f", noise seed {seed}" if seed is not None else ""
            blocks = f", {extra['mean_blocks']:.2f} blocks per image ({extra['exit_rule']})" if extra else ""
            print(f"accuracy {100 * result['accuracy']:.2f}% ({result['correct']}/{result['examples']}) on "
                  f"{args.data}; {result['images_per_s']:.0f} images/s (batch {args.batch_size}, "
                  f"{model.info.precision}, {args.mode}{noise}{blocks}); peak RSS {result['peak_rss_mb']:.0f} MB")
        return 0
    raise AssertionError(args.command)


def _resolve_seed(model: edge.EdgeModel, seed: int | None) -> int | None:
    """The seed of a stochastic model's noise: the given one, else a fresh one; None for a deterministic model."""
    if not model.stochastic:
        return None
    return seed if seed is not None else edge.fresh_seed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("serve", "query") and _WITHOUT_PACKAGE:  # their modules import the package's edge
            raise edge.EdgeError(f"{args.command} needs the noprop-fl package ({_WITHOUT_PACKAGE}): pip install "
                                 "noprop-fl; edge.py, edge_data.py and edge_cli.py alone run info, predict and eval")
        return _run(args)
    except edge.EdgeError as exc:  # and edge_client.RemoteError, a failed call: exit 1
        print(f"noprop-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("noprop-edge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
