"""Export a noprop-fl checkpoint (centralized or federated: one format) as one self-contained ONNX file.

The graph is the whole inference chain (NOPROP_SPEC.md 2, Eq. 3): the input normalisation, the T blocks with
the schedule's coefficients a_t, b_t, sqrt(c_t) folded in as constants, the class embedding, the output head,
softmax and argmax.

The plain CNN (cnn, the FedAvg peer) is one network call: normalisation, the network, softmax and argmax; it
draws no noise, so it is exported in deterministic mode only.

The continuous-time methods (ct, fm, adjoint: one network shared across t) are exported the same way with
their integration from t = 0 to 1 unrolled into a chain of `steps` network calls (default: the checkpoint's
configured steps), so T of the metadata is the step count. NoProp-CT's learned noise schedule is evaluated
once, here, at the step times t_k = k / steps (in float64, as the PyTorch model does it), and its step
coefficients enter the graph as constants: the graph holds no part of the schedule's network. NoProp-FM
(Euler or Heun) and the adjoint ODE (torchdiffeq's fixed-grid solver, traced) need no schedule. In stochastic
mode ct draws z_0 = noise[0] and adds noise[k + 1] at step k; fm and adjoint only start from z_0 = noise[0]
(their ODE adds no noise), with the same [T + 1, N, d] input so that every exported model has one contract.

- Input `image`: float32 [N, C, H, W] (or [N, F] for feature models), N dynamic, in RAW pixel scale: values
  in [0, 1], i.e. uint8 / 255, exactly what noprop.data produces before it normalises. The graph normalises
  inside, (image - mean) / std per channel, with the mean and std stored in the checkpoint (the training
  split's statistics); they are also in the metadata, for information.
- Input `noise` (stochastic mode only): float32 [T + 1, N, d]: noise[0] is z_0, noise[t] is eps_t of step t
  (the backprop baseline uses only noise[0]). The caller supplies the randomness, so runs are reproducible.
  Deterministic mode (the default) has no such input: z_0 = 0 and eps = 0.
- Outputs `probabilities` float32 [N, classes] and `label` int64 [N].
- metadata_props: the fields of noprop.deploy.edge.ModelInfo (= the ModelManifest message of
  proto/noprop/v1/inference.proto): class names, input shape, layout, scale and normalisation, T, method,
  embedding, head, schedule, mode, precision, noprop-fl version, training metrics (JSON), dataset, exporter.
  The same manifest is written beside the .onnx as <name>.manifest.json, with the file's SHA-256.

The eval-mode BatchNorm layers, each of which follows a Linear, are folded into that Linear before export
(fewer nodes, and the int8 quantizer then sees plain Gemms); the parity tests compare against the unfolded
checkpoint model.

Exporter: the TorchScript-based exporter (torch.onnx.export(..., dynamo=False)) with the opset pinned to 17 and
a dynamic batch axis, by default. Measured on torch 2.14.1 (2-core CPU, T=3 test models) against the dynamo
exporter (dynamo=True with dynamic_shapes):
  - dynamo cannot convert the radial head: aten::_cdist_forward has no ONNX translation ("No decompositions
    registered"), so a whole supported model configuration would not export;
  - dynamo takes 3.5-7 s per export of a tiny model against 0.2 s for TorchScript (and proportionally longer
    for the full-size chain), and it needs onnxscript, which is only a dev extra of this project;
  - both give identical graphs for our purposes: parity with PyTorch within 1e-7 and dynamic batch.
TorchScript is deprecated upstream but present and working through torch 2.14 (the project pins torch < 2.15),
and opset 17 runs on any onnxruntime >= 1.14, which matters for old edge images. `exporter="dynamo"` stays
available (`noprop-export --exporter dynamo`, opset >= 18) for models without the radial head, as the path to
take once the TorchScript exporter is removed.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

import noprop
from noprop.checkpoint import Checkpoint
from noprop.deploy.edge import (
    INPUT_NAME,
    MODES,
    NOISE_NAME,
    OUTPUT_NAMES,
    ModelInfo,
    manifest_json,
    manifest_path_for,
)
from noprop.io import atomic_write, atomic_write_text
from noprop.methods import method_named

CHECKPOINT_FORMAT = "noprop-fl/checkpoint"
DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
_PROTOBUF_LIMIT = 2**31 - 1  # one self-contained file: no external data


class ExportError(Exception):
    """An export that cannot be done; the one-line message says why and what to do."""


class InferenceGraph(nn.Module):
    """What goes into the .onnx: raw image (and noise) -> normalise -> chain -> (probabilities, label)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], input_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        view = (1, -1, 1, 1) if len(input_shape) == 3 else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(view))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.model((image - self.mean) / self.std, noise)
        return probabilities, probabilities.argmax(dim=1)


class FrozenStepCoefficients(nn.Module):
    """NoProp-CT's learned schedule evaluated at export time: the [steps, 3] step coefficients as a constant.

    Stands in for the model's LearnedNoiseSchedule in the exported copy, so that the traced chain reads
    constants rather than re-running the schedule's network (and its float64 arithmetic) inside the graph.
    """

    def __init__(self, schedule: nn.Module, steps: int, mode: str):
        super().__init__()
        self.steps, self.mode = steps, mode
        self.register_buffer("coefficients", schedule.step_coefficients(steps, mode).detach().clone())

    def step_coefficients(self, steps: int, mode: str = "deterministic") -> torch.Tensor:
        if (steps, mode) != (self.steps, self.mode):
            raise RuntimeError(f"the schedule was frozen for {self.steps} {self.mode} steps, asked for {steps} {mode}")
        return self.coefficients


class UnrolledChain(nn.Module):
    """A continuous-time model with its step count fixed: forward(x, noise) like a NoProp-DT chain, which the
    tracer unrolls into `steps` network calls."""

    def __init__(self, model: nn.Module, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, noise, self.steps)


def is_continuous(ckpt: Checkpoint) -> bool:
    return method_named(ckpt.method).continuous


def export_steps(ckpt: Checkpoint, steps: int | None) -> int | None:
    """The number of integration steps to unroll (None for dt and backprop, whose T is fixed by their blocks)."""
    if not is_continuous(ckpt):
        if steps is not None:
            fixed = "is one network call" if ckpt.method == "cnn" else f"has T={ckpt.config.T} fixed blocks"
            raise ExportError(f"--steps applies to ct, fm and adjoint checkpoints; this {ckpt.method} checkpoint "
                              f"{fixed}: leave --steps out")
        return None
    steps = ckpt.config.steps if steps is None else steps
    if steps < 1:
        raise ExportError(f"--steps must be at least 1, got {steps}")
    return steps


def inference_chain(ckpt: Checkpoint, model: nn.Module, steps: int | None, mode: str) -> nn.Module:
    """What InferenceGraph wraps: forward(x, noise) -> probabilities (a copy; the checkpoint's model is untouched)."""
    if steps is None:
        return fold_batchnorm(model)
    model = copy.deepcopy(model).eval()
    if ckpt.method == "ct":
        model.schedule = FrozenStepCoefficients(model.schedule, steps, mode)
    return UnrolledChain(model, steps)


def schedule_metadata(ckpt: Checkpoint, model: nn.Module | None, steps: int | None) -> dict:
    """The schedule field: dt's cosine settings, ct's learned endpoints and alpha_bar at the step times, or
    {"kind": "none"} for fm, adjoint and cnn (no noise schedule at inference)."""
    if ckpt.method == "cnn":
        return {"kind": "none"}
    if steps is None:
        return {"kind": "cosine", **ckpt.config.schedule().to_config()}
    if ckpt.method != "ct":
        return {"kind": "none"}
    schedule = model.schedule
    with torch.no_grad():
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).to(schedule.gamma0.dtype)
        alpha_bar = schedule.alpha_bar(grid).double().tolist()
        return {**schedule.to_config(), "alpha_bar": alpha_bar}


def solver_name(ckpt: Checkpoint, mode: str) -> str:
    """How a continuous chain steps from t_k to t_k+1: ct's DDIM or posterior step, fm's / adjoint's ODE solver."""
    if ckpt.method == "ct":
        return "ddim" if mode == "deterministic" else "posterior"
    return ckpt.config.solver


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with every Linear -> BatchNorm1d pair of an nn.Sequential folded into one
    Linear (the BatchNorm becomes an Identity)."""
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            lin, bn = seq[i], seq[i + 1]
            if (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats
                    and bn.running_mean is not None and lin.out_features == bn.num_features):
                seq[i] = fuse_linear_bn_eval(lin, bn)
                seq[i + 1] = nn.Identity()
    return model


def model_info(ckpt: Checkpoint, mode: str = "deterministic", exporter: str = "torchscript",
               opset: int = DEFAULT_OPSET, steps: int | None = None, model: nn.Module | None = None) -> ModelInfo:
    """The metadata of the exported model, from the checkpoint (and, for ct, its model's learned schedule).

    steps: the unrolled step count of a continuous model (None: its configured steps); None for dt and backprop.
    """
    steps = export_steps(ckpt, steps)
    cfg = ckpt.config if steps is None else dataclasses.replace(ckpt.config, steps=steps)
    data = ckpt.data or {}
    mean, std = data.get("mean"), data.get("std")
    channels = cfg.input_shape[0]
    if mean is None or std is None:
        raise ExportError("the checkpoint records no input normalisation (data.mean / data.std): re-save it with "
                          "noprop-train or noprop-server")
    if len(mean) != channels or len(std) != channels:
        raise ExportError(f"the checkpoint's normalisation has {len(mean)} means / {len(std)} stds for "
                          f"{channels} input channels: the checkpoint is inconsistent")
    if any(s <= 0 for s in std):
        raise ExportError(f"the checkpoint's normalisation has a non-positive std {std}")
    classes = [str(c) for c in data.get("classes") or range(cfg.num_classes)]
    if len(classes) != cfg.num_classes:
        raise ExportError(f"the checkpoint names {len(classes)} classes but the model has {cfg.num_classes}")
    if ckpt.method == "ct" and model is None:
        model = _build(ckpt)
    return ModelInfo(
        class_names=classes, input_shape=tuple(cfg.input_shape), mean=[float(v) for v in mean],
        std=[float(v) for v in std], T=cfg.T, method=ckpt.method, embedding=cfg.embedding,
        embedding_dim=cfg.embedding_dim, head="nearest-embedding" if ckpt.method == "fm" else cfg.head,
        schedule=schedule_metadata(ckpt, model, steps), mode=mode, precision="fp32",
        noprop_fl_version=noprop.__version__, dataset=str(data.get("name", "")),
        training_metrics=dict(ckpt.metrics or {}),
        exporter=f"torch {torch.__version__.split('+')[0]} torch.onnx "
                 f"({'TorchScript' if exporter == 'torchscript' else 'dynamo'})",
        opset=opset, steps=steps or 0, solver=solver_name(ckpt, mode) if steps else "",
    )


def _build(ckpt: Checkpoint) -> nn.Module:
    try:
        return ckpt.model()
    except Exception as exc:  # a state dict that does not fit its config
        raise ExportError(f"the checkpoint's weights do not fit its config ({type(exc).__name__}): "
                          "the checkpoint is damaged") from None


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _export_torchscript(graph: InferenceGraph, args: tuple, names: list[str], opset: int) -> onnx.ModelProto:
    dynamic = {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    if NOISE_NAME in names:
        dynamic[NOISE_NAME] = {1: "N"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice and tracer warnings about shape arithmetic
        torch.onnx.export(graph, args, buf, dynamo=False, input_names=names, output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(graph: InferenceGraph, args: tuple, names: list[str], opset: int) -> onnx.ModelProto:
    batch = torch.export.Dim("N", min=1)
    shapes = ({0: batch},) + (({1: batch},) if NOISE_NAME in names else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, args, None, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                    output_names=list(OUTPUT_NAMES), opset_version=opset, optimize=True,
                                    verbose=False)
    return program.model_proto


def export_onnx(ckpt: Checkpoint, out: str | os.PathLike, mode: str = "deterministic", opset: int | None = None,
                exporter: str = "torchscript", write_manifest: bool = True, steps: int | None = None) -> Path:
    """Write the checkpoint's inference chain to `out` (atomically) and its manifest beside it.

    steps: for ct, fm and adjoint, the number of integration steps unrolled into the graph (default: the
    checkpoint's configured steps); an error for dt and backprop.
    """
    if mode not in MODES:
        raise ExportError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "stochastic" and ckpt.method == "cnn":
        raise ExportError("a cnn checkpoint draws no noise at inference: export it in deterministic mode "
                          "(leave --mode out)")
    if mode == "stochastic" and getattr(ckpt.config, "readout", "chain") == "ensemble":
        raise ExportError("this checkpoint reads out the ensemble of its blocks, which draws no noise: export it in "
                          "deterministic mode (leave --mode out), or add --readout chain")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if opset is None:
        opset = DEFAULT_OPSET if exporter == "torchscript" else DYNAMO_MIN_OPSET
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}, got {opset}")
    steps = export_steps(ckpt, steps)
    model = _build(ckpt)
    info = model_info(ckpt, mode, exporter, opset, steps, model)
    graph = InferenceGraph(inference_chain(ckpt, model, steps, mode), info.mean, info.std, info.input_shape).eval()
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, *info.input_shape, generator=gen)
    names = [INPUT_NAME]
    args: tuple = (example,)
    if mode == "stochastic":
        args = (example, torch.randn(info.T + 1, 2, info.embedding_dim, generator=gen))
        names.append(NOISE_NAME)
    try:
        with torch.no_grad():
            proto = (_export_torchscript if exporter == "torchscript" else _export_dynamo)(graph, args, names, opset)
    except Exception as exc:
        hint = "; try --exporter torchscript" if exporter == "dynamo" else ""
        raise ExportError(f"the {exporter} exporter failed ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}){hint}") from None
    set_metadata(proto, info.to_metadata())
    proto.producer_name, proto.producer_version = "noprop-fl", noprop.__version__
    length = f"{info.steps} unrolled {info.solver} steps" if info.steps else f"T={info.T}"
    kind = "plain CNN (the FedAvg peer), one network call" if info.method == "cnn" else \
        f"NoProp {info.method} chain, {length}" if getattr(ckpt.config, "readout", "chain") == "chain" else \
        f"NoProp {info.method}, the ensemble of its T={info.T} blocks"
    proto.doc_string = (f"{kind}, {info.mode}: input image float32 "
                        f"[N, {', '.join(map(str, info.input_shape))}] raw pixels in [0, 1], normalised in the "
                        "graph; outputs probabilities and label.")
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise ExportError(f"the model is {len(data) / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit")
    onnx.checker.check_model(proto, full_check=True)
    out = make_readable(atomic_write(out, lambda f: f.write(data)))
    if write_manifest:
        write_manifest_file(out, info)
    return out


def write_manifest_file(onnx_path: str | os.PathLike, info: ModelInfo | None = None) -> Path:
    """<name>.manifest.json beside the .onnx: its ModelManifest as JSON, with the file's SHA-256 and size."""
    onnx_path = Path(onnx_path)
    if info is None:
        info = ModelInfo.from_metadata(read_metadata(onnx_path), onnx_path)
    return make_readable(atomic_write_text(manifest_path_for(onnx_path), manifest_json(info, onnx_path)))


def write_checkpoint_manifest(checkpoint: str | os.PathLike) -> Path:
    """<name>.manifest.json beside a checkpoint: the ModelManifest of what it would export to (format
    noprop-fl/checkpoint; no mode, exporter or opset yet), with the checkpoint file's SHA-256 and size."""
    from noprop.checkpoint import load_checkpoint

    checkpoint = Path(checkpoint)
    info = model_info(load_checkpoint(checkpoint))
    info.mode, info.exporter, info.opset = "", "", 0
    out = checkpoint.with_name(checkpoint.stem + ".manifest.json")
    return make_readable(atomic_write_text(out, manifest_json(info, checkpoint, fmt=CHECKPOINT_FORMAT)))


def make_readable(path: Path) -> Path:
    """atomic_write keeps its temporary file's mode, 0600; a model is meant to be copied and read: 0644."""
    os.chmod(path, 0o644)
    return path
