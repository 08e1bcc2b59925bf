"""noprop-export: a checkpoint -> one self-contained .onnx file (fp32 or int8) for noprop-edge.

    noprop-export runs/x/checkpoint.pt -o model.onnx
    noprop-export runs/x/checkpoint.pt -o model.int8.onnx --int8 --calibration 512
    noprop-export runs/x/checkpoint.pt -o model.onnx --mode stochastic
    noprop-export runs/x/checkpoint.pt --manifest-only   # writes runs/x/checkpoint.manifest.json only
    noprop-export runs/ct/checkpoint.pt -o ct10.onnx --steps 10   # ct / fm / adjoint: unroll 10 ODE steps
    noprop-export runs/dt/checkpoint.pt -o model.onnx --blocks     # + model.blocks.zip: anytime / streamed

The graph takes `image` float32 [N, C, H, W] in raw pixel scale ([0, 1], uint8 / 255) and normalises it
inside with the checkpoint's mean and std (see noprop.deploy.export). NoProp-CT, NoProp-FM and adjoint
checkpoints are exported with their integration from t = 0 to 1 unrolled into --steps network calls. Beside
the .onnx goes <name>.manifest.json (the ModelManifest of proto/noprop/v1/inference.proto).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from noprop.checkpoint import CheckpointError
from noprop.deploy.blocks import DEFAULT_HOLDOUT, check_bundle_checkpoint
from noprop.deploy.calibration import DEFAULT_MAX_LOSS_POINTS
from noprop.deploy.edge import EdgeError, bundle_path_for, manifest_path_for
from noprop.deploy.export import (
    DEFAULT_OPSET,
    EXPORTERS,
    MODES,
    ExportError,
    export_onnx,
    export_steps,
    write_checkpoint_manifest,
    write_manifest_file,
)
from noprop.deploy.quantize import DEFAULT_SCHEME, SCHEMES, calibration_images, quantize_model
from noprop.io import atomic_write
from noprop.model_configs import READOUTS
from noprop.ops.cli import OneLineParser
from noprop.sources import DatasetError


@dataclass
class ExportResult:
    path: Path
    manifest: Path | None
    bytes: int
    fp32_bytes: int
    precision: str
    steps: int | None = None  # ct, fm, adjoint: the unrolled step count
    bundle: Path | None = None  # --blocks: the block bundle beside the model
    anytime: dict | None = None  # --blocks: its exit calibration (None: not calibrated)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, mode: str = "deterministic",
                      opset: int | None = None, exporter: str = "torchscript", int8: bool = False,
                      calibration: int = 512, data: str | None = None, data_root: str | os.PathLike | None = None,
                      seed: int = 0, write_manifest: bool = True, steps: int | None = None, blocks: bool = False,
                      holdout: int = 5000, anytime_loss: float = 0.5,
                      int8_scheme: str = DEFAULT_SCHEME, readout: str | None = None) -> ExportResult:
    """noprop-export's work: load, export fp32, optionally quantize to int8 (calibrated on training images).

    readout: chain | ensemble, what the exported dt model computes from the same weights (None: the checkpoint's)."""
    from noprop.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if readout is not None:
        if readout not in READOUTS:
            raise ExportError(f"--readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        if ckpt.method != "dt" and readout != "chain":
            raise ExportError(f"--readout ensemble is NoProp-DT's; this is a {ckpt.method} checkpoint")
        if ckpt.method == "dt":
            ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, readout=readout))
    out = Path(out)
    steps = export_steps(ckpt, steps)  # a bad --steps fails before any work (or calibration data loading)
    if blocks:
        check_bundle_checkpoint(ckpt, mode)
        if holdout < 0:
            raise ExportError(f"--holdout must be at least 0 images (0: no calibration), got {holdout}")
        if not 0 <= anytime_loss <= 100:
            raise ExportError(f"--anytime-loss must be in 0 .. 100 points, got {anytime_loss}")
    if not int8:
        path = export_onnx(ckpt, out, mode, opset, exporter, write_manifest, steps)
        size = path.stat().st_size
        result = ExportResult(path, manifest_path_for(path) if write_manifest else None, size, size, "fp32", steps)
    else:
        if int8_scheme not in SCHEMES:
            raise ExportError(f"--int8-scheme must be one of {', '.join(SCHEMES)}, got {int8_scheme!r}")
        images, dataset = None, ""
        if int8_scheme == "static":
            dataset = data or (ckpt.data or {}).get("name")
            if not dataset:
                raise ExportError("the checkpoint does not name its dataset: pass --data for the calibration images")
            images = calibration_images(dataset, calibration, root=data_root, seed=seed,
                                        expect_shape=tuple(ckpt.config.input_shape))
        with tempfile.TemporaryDirectory(prefix="noprop-export-") as tmp:
            fp32 = export_onnx(ckpt, Path(tmp) / "fp32.onnx", mode, opset, exporter, write_manifest=False,
                               steps=steps)
            fp32_bytes = fp32.stat().st_size
            path = quantize_model(fp32, out, images, seed=seed, dataset=dataset, scheme=int8_scheme)
        if write_manifest:
            write_manifest_file(path)
        result = ExportResult(path, manifest_path_for(path) if write_manifest else None, path.stat().st_size,
                              fp32_bytes, "int8", steps)
    if blocks:
        result.bundle, result.anytime = export_bundle(ckpt, result.path, int8, holdout, anytime_loss, data,
                                                      data_root, opset or DEFAULT_OPSET, write_manifest)
    return result


def export_bundle(ckpt, model_path: Path, int8: bool, holdout: int, anytime_loss: float, data: str | None,
                  data_root, opset: int, write_manifest: bool) -> tuple[Path, dict | None]:
    """<model>.blocks.zip beside model_path (int8 when the model is), calibrated on `holdout` held-out test images
    (0: not calibrated); the calibration also goes into model_path's metadata (and its manifest)."""
    from noprop.deploy import blocks
    from noprop.deploy.export import read_metadata, set_metadata

    bundle = bundle_path_for(model_path)
    metadata = read_metadata(model_path)  # the model's own (precision, quantization, exporter ...)
    metadata.pop("anytime", None)
    with tempfile.TemporaryDirectory(prefix="noprop-blocks-") as tmp:
        paths = blocks.export_block_graphs(ckpt, Path(tmp), opset)
        if int8:
            paths = blocks.quantize_block_graphs(paths, Path(tmp) / "int8")
        blocks.write_bundle(bundle, metadata, paths, readout=blocks.bundle_readout(ckpt))
    if not holdout:
        return bundle, None
    dataset = data or (ckpt.data or {}).get("name")
    if not dataset:
        raise ExportError("the checkpoint does not name its dataset: pass --data for the holdout images")
    images, labels, source = blocks.holdout_images(dataset, holdout, root=data_root,
                                            expect_shape=tuple(ckpt.config.input_shape))
    anytime = blocks.calibrate_bundle(bundle, images, labels, source, anytime_loss)
    import onnx

    proto = onnx.load(str(model_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta["anytime"] = json.dumps({**{k: v for k, v in anytime.items() if k != "rules"}, "bundle": bundle.name},
                                 sort_keys=True)
    set_metadata(proto, meta)
    data_bytes = proto.SerializeToString()
    atomic_write(model_path, lambda f: f.write(data_bytes))
    os.chmod(model_path, 0o644)
    if write_manifest:
        write_manifest_file(model_path)
    return bundle, anytime


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="noprop-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint.pt written by noprop-train or noprop-server")
    p.add_argument("-o", "--output", help="the .onnx file to write (default: model.onnx, or model.int8.onnx with "
                                          "--int8, beside the checkpoint)")
    p.add_argument("--mode", choices=MODES, default="deterministic",
                   help="deterministic (z_0 = 0, eps = 0; input image only) or stochastic (input noise too)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="ct, fm, adjoint: integration steps to unroll into the graph (default: the checkpoint's "
                        "configured steps)")
    p.add_argument("--int8", action="store_true", help="int8 quantization (per-channel int8 weights)")
    p.add_argument("--int8-scheme", choices=SCHEMES, default=DEFAULT_SCHEME,
                   help="dynamic (default: the FC layers, activations quantized per call; no calibration data) or "
                        "static (QDQ Conv + Gemm, calibrated on --calibration training images)")
    p.add_argument("--calibration", type=int, default=512, metavar="N",
                   help="training images to calibrate int8 on (default 512)")
    p.add_argument("--data", help="dataset of the calibration images (default: the checkpoint's)")
    p.add_argument("--data-root", help="folder holding the datasets (default: $NOPROP_DATA or ./data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration image choice")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}; dynamo: 18)")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx path (default torchscript: see noprop.deploy.export)")
    p.add_argument("--readout", choices=READOUTS,
                   help="dt: what the exported model computes from the checkpoint's weights: chain (Eq. 3, the head "
                        "on z_T) or ensemble (the blocks' geometric mean) (default: the checkpoint's own; federated "
                        "runs read out the ensemble); --mode stochastic needs chain")
    p.add_argument("--blocks", action="store_true",
                   help="dt: also write <name>.blocks.zip, one graph per block, for noprop-edge --mode anytime and "
                        "streamed, with the exit threshold calibrated on held-out images")
    p.add_argument("--holdout", type=int, default=DEFAULT_HOLDOUT, metavar="N",
                   help=f"--blocks: calibrate the exit on the last N images of the test split (at most half of it; "
                        f"default {DEFAULT_HOLDOUT}; 0: no calibration)")
    p.add_argument("--anytime-loss", type=float, default=DEFAULT_MAX_LOSS_POINTS, metavar="POINTS",
                   help=f"--blocks: accuracy the exit may lose against the full chain on the holdout, in points "
                        f"(default {DEFAULT_MAX_LOSS_POINTS})")
    p.add_argument("--no-manifest", action="store_true", help="do not write <name>.manifest.json")
    p.add_argument("--manifest-only", action="store_true",
                   help="export nothing: write the checkpoint's manifest beside it (<checkpoint>.manifest.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output) if args.output else \
        Path(args.checkpoint).with_name("model.int8.onnx" if args.int8 else "model.onnx")
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.manifest_only:
            print(f"noprop-export: wrote {write_checkpoint_manifest(args.checkpoint)}")
            return 0
        result = export_checkpoint(args.checkpoint, out, mode=args.mode, opset=args.opset, exporter=args.exporter,
                                   int8=args.int8, calibration=args.calibration, data=args.data,
                                   data_root=args.data_root, seed=args.seed, write_manifest=not args.no_manifest,
                                   steps=args.steps, blocks=args.blocks, holdout=args.holdout,
                                   anytime_loss=args.anytime_loss, int8_scheme=args.int8_scheme,
                                   readout=args.readout)
    except (CheckpointError, DatasetError, ExportError, EdgeError) as exc:
        print(f"noprop-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noprop-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    size = f"{result.bytes / 1e6:.2f} MB"
    if result.precision == "int8":
        size += f", {100 * result.bytes / result.fp32_bytes:.1f}% of the fp32 {result.fp32_bytes / 1e6:.2f} MB"
    steps = f", {result.steps} steps unrolled" if result.steps else ""
    print(f"noprop-export: wrote {result.path} ({result.precision}, {args.mode}{steps}, {size})"
          + (f" and {result.manifest}" if result.manifest else ""))
    if result.bundle:
        a = result.anytime
        calib = (f"exit {a['rule']} >= {a['threshold']:.6g}: {100 * a['accuracy']:.2f}% against the full chain's "
                 f"{100 * a['full_accuracy']:.2f}% in {a['mean_blocks']:.2f} of {a['T']} blocks on "
                 f"{a['examples']} held-out images") if a else "no exit calibration (--holdout 0)"
        print(f"noprop-export: wrote {result.bundle} ({result.bundle.stat().st_size / 1e6:.2f} MB; {calib})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
