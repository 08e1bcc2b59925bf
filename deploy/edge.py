"""noprop-edge: run an exported NoProp model on a device with onnxruntime and numpy alone.

This module imports numpy and onnxruntime, nothing else at import time: never torch, never the rest of
noprop. Pillow is imported lazily to read image files, and the generated modules of noprop.proto (with protobuf)
for `info --json`. So `predict`, `eval` and `info` also work from this one file copied alone onto a device
(`python edge.py predict model.onnx img.png`). `serve` and `query` need grpcio and noprop.proto anyway: they live
in noprop.deploy.edge_service and noprop.deploy.edge_client, imported only when they run.

The model file (written by noprop-export) takes `image` float32 [N, C, H, W] (or [N, F]) in raw pixel scale,
values in [0, 1] (uint8 / 255), and normalises inside the graph with the training set's mean and std; in
stochastic mode it also takes `noise` float32 [T + 1, N, d]. It returns `probabilities` [N, classes] and
`label` int64 [N]. Its metadata_props describe it (ModelInfo below; the same fields as the ModelManifest
message of proto/noprop/v1/inference.proto).

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
import hashlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort

FORMAT = "noprop-fl/onnx-model"
FORMAT_VERSION = 1
INPUT_SCALE = "[0, 1]"  # raw pixels: uint8 / 255
MODES = ("deterministic", "stochastic")
PRECISIONS = ("fp32", "int8")
RUN_MODES = ("full", "anytime", "streamed")  # --mode of predict / eval
EXIT_RULES = ("confidence", "margin")  # on the current block's posterior p_t: max p_t, or top-1 minus top-2
BUNDLE_FORMAT = "noprop-fl/block-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_MANIFEST = "manifest.json"
BLOCK_INPUTS = ("image", "z")  # of each block graph: raw image, z_{t-1}
BLOCK_OUTPUTS = ("block_probabilities", "z_next")  # p_t and z_t; the last block adds OUTPUT_NAMES
BUNDLE_READOUTS = ("chain", "ensemble")  # what a bundle's rows are answered by (the manifest's "readout")
TINY = float(np.finfo(np.float32).tiny)  # log p_t's floor for the ensemble: a float32 softmax can underflow to 0
DEFAULT_MAX_LOSS_POINTS = 0.5  # the anytime calibration's accuracy loss against the full chain, in points
INPUT_NAME, NOISE_NAME = "image", "noise"
OUTPUT_NAMES = ("probabilities", "label")
SERVICE_NAME = "noprop.v1.Inference"
DEFAULT_PORT = 50051
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONCURRENT = 64  # calls in progress or queued; more get RESOURCE_EXHAUSTED (bench/load_edge.py)
SEED_LIMIT = 2**64  # --seed and PredictRequest.seed (uint64): 0 .. 2**64 - 1
DRAWN_SEED_LIMIT = 2**53  # a seed drawn for an unseeded request stays exact as a JSON number (a double)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_MAX_MESSAGE = 200


class EdgeError(Exception):
    """A user-facing failure with a one-line message naming the file and the fix."""

    exit_code = 2  # bad input


def _one_line(exc: object, limit: int = _MAX_MESSAGE) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fresh_seed() -> int:
    """A new seed for a request that gave none, so that unseeded calls differ (and each can be repeated)."""
    return secrets.randbelow(DRAWN_SEED_LIMIT)


def manifest_path_for(onnx_path: str | Path) -> Path:
    """model.onnx -> model.manifest.json (beside it)."""
    p = Path(onnx_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".manifest.json")


# -- what an exported model is ---------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """The metadata of an exported model: metadata_props of the .onnx, the manifest file, ModelInfo RPC.

    In metadata_props every field is one key holding a string: numbers as decimal text, lists and dicts as
    JSON. The keys are the field names of the ModelManifest message.
    """

    class_names: list[str]
    input_shape: tuple[int, ...]  # one example: (C, H, W) or (F,)
    mean: list[float]
    std: list[float]
    T: int
    method: str
    embedding: str
    embedding_dim: int
    head: str
    schedule: dict
    mode: str = "deterministic"
    precision: str = "fp32"
    noprop_fl_version: str = ""
    dataset: str = ""
    training_metrics: dict = field(default_factory=dict)
    exporter: str = ""
    opset: int = 0
    quantization: dict = field(default_factory=dict)
    steps: int = 0  # ct, fm, adjoint: integration steps unrolled into the graph (= T); 0 for dt and backprop
    solver: str = ""  # ct: ddim | posterior; fm: euler | heun; adjoint: euler | midpoint | rk4
    normalised_in_graph: bool = True
    input_scale: str = INPUT_SCALE
    anytime: dict = field(default_factory=dict)  # dt: the exit calibration of the block bundle beside the model

    @property
    def input_layout(self) -> str:
        return "NCHW" if len(self.input_shape) == 3 else "NF"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def noise_shape(self) -> tuple[int, int]:
        """(T + 1, d): the noise input is [T + 1, N, d]."""
        return self.T + 1, self.embedding_dim

    def summary(self) -> str:
        length = f"{self.steps} {self.solver} steps" if self.steps else f"T={self.T}"
        return (f"{self.method} {length} {self.embedding} {self.precision} {self.mode}, "
                f"input {list(self.input_shape)}, {self.num_classes} classes")

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "noprop_fl_version": self.noprop_fl_version,
            "method": self.method,
            "class_names": json.dumps(list(self.class_names)),
            "input_shape": json.dumps(list(self.input_shape)),
            "input_layout": self.input_layout,
            "input_scale": self.input_scale,
            "normalisation": json.dumps({"mean": list(self.mean), "std": list(self.std),
                                         "in_graph": self.normalised_in_graph}),
            "T": str(self.T),
            "embedding": self.embedding,
            "embedding_dim": str(self.embedding_dim),
            "head": self.head,
            "schedule": json.dumps(self.schedule),
            "mode": self.mode,
            "precision": self.precision,
            "dataset": self.dataset,
            "training_metrics": json.dumps(self.training_metrics, sort_keys=True),
            "exporter": self.exporter,
            "opset": str(self.opset),
        }
        if self.quantization:
            meta["quantization"] = json.dumps(self.quantization, sort_keys=True)
        if self.anytime:
            meta["anytime"] = json.dumps(self.anytime, sort_keys=True)
        if self.steps:
            meta["steps"], meta["solver"] = str(self.steps), self.solver
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str | Path = "model") -> ModelInfo:
        if meta.get("format") != FORMAT:
            raise EdgeError(f"{where} is an ONNX model but not one exported by noprop-export (no '{FORMAT}' "
                            "metadata): export the checkpoint with noprop-export")
        try:
            version = int(meta.get("format_version", "0"))
        except ValueError:
            version = -1
        if version != FORMAT_VERSION:
            raise EdgeError(f"{where} has model format version {meta.get('format_version')}, this runtime reads "
                            f"{FORMAT_VERSION}: use a matching noprop-fl")
        try:
            norm = json.loads(meta["normalisation"])
            info = cls(
                class_names=[str(c) for c in json.loads(meta["class_names"])],
                input_shape=tuple(int(s) for s in json.loads(meta["input_shape"])),
                mean=[float(v) for v in norm["mean"]],
                std=[float(v) for v in norm["std"]],
                normalised_in_graph=bool(norm.get("in_graph", True)),
                T=int(meta["T"]),
                method=meta["method"],
                embedding=meta["embedding"],
                embedding_dim=int(meta["embedding_dim"]),
                head=meta.get("head", ""),
                schedule=json.loads(meta.get("schedule", "{}")),
                mode=meta["mode"],
                precision=meta.get("precision", "fp32"),
                noprop_fl_version=meta.get("noprop_fl_version", ""),
                dataset=meta.get("dataset", ""),
                training_metrics=json.loads(meta.get("training_metrics", "{}")),
                exporter=meta.get("exporter", ""),
                opset=int(meta.get("opset", "0")),
                quantization=json.loads(meta.get("quantization", "{}")),
                anytime=json.loads(meta.get("anytime", "{}")),
                steps=int(meta.get("steps", "0")),
                solver=meta.get("solver", ""),
                input_scale=meta.get("input_scale", INPUT_SCALE),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise EdgeError(f"{where} has damaged noprop-fl metadata ({type(exc).__name__}: {_one_line(exc)}): "
                            "export it again") from None
        if info.mode not in MODES or len(info.input_shape) not in (1, 3) or info.num_classes < 2:
            raise EdgeError(f"{where} has inconsistent noprop-fl metadata (mode {info.mode!r}, input "
                            f"{list(info.input_shape)}, {info.num_classes} classes): export it again")
        return info

    def to_manifest(self, file_name: str = "", file_sha256: str = "", file_bytes: int = 0, fmt: str = FORMAT):
        """The ModelManifest message (needs protobuf and noprop.proto)."""
        pb = _proto_modules()[0]
        m = pb.ModelManifest(
            format=fmt, format_version=FORMAT_VERSION, noprop_fl_version=self.noprop_fl_version,
            method=self.method, class_names=self.class_names, input_shape=list(self.input_shape),
            input_layout=self.input_layout, input_scale=self.input_scale,
            normalisation=pb.Normalisation(mean=self.mean, std=self.std, in_graph=self.normalised_in_graph),
            T=self.T, embedding=self.embedding, embedding_dim=self.embedding_dim, head=self.head,
            mode=self.mode, precision=self.precision, dataset=self.dataset, exporter=self.exporter,
            opset=self.opset, file_name=file_name, file_sha256=file_sha256, file_bytes=file_bytes,
            steps=self.steps, solver=self.solver,
        )
        sched = self.schedule
        m.schedule.kind = str(sched.get("kind", "cosine"))
        m.schedule.T = int(sched.get("T", self.T))
        m.schedule.s = float(sched.get("s", 0.0))
        m.schedule.clip = float(sched.get("clip", 0.0))
        if sched.get("max_delta_snr") is not None:
            m.schedule.max_delta_snr = float(sched["max_delta_snr"])
        for key in ("gamma0", "gamma1"):
            if sched.get(key) is not None:
                setattr(m.schedule, key, float(sched[key]))
        m.schedule.alpha_bar.extend(float(v) for v in sched.get("alpha_bar", ()))
        m.training_metrics.update(_json_safe(self.training_metrics))
        if self.quantization:
            m.quantization.update(_json_safe(self.quantization))
        return m


def _json_safe(d: dict) -> dict:
    """Round-trip through JSON: keys become strings, tuples lists (what a protobuf Struct accepts)."""
    return json.loads(json.dumps(d))


def manifest_json(info: ModelInfo, path: str | Path | None = None, fmt: str = FORMAT) -> str:
    """The ModelManifest as JSON (proto3 JSON mapping, field names as in the .proto); with the SHA-256 and size of
    the file at `path` when given."""
    from google.protobuf import json_format

    file_args = (Path(path).name, file_sha256(path), Path(path).stat().st_size) if path is not None else ()
    message = info.to_manifest(*file_args, fmt=fmt)
    return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, indent=2) + "\n"


def _proto_modules():
    try:
        from noprop.proto import inference_pb2, inference_pb2_grpc
    except ImportError as exc:
        raise EdgeError(f"this needs noprop-fl's generated protocol modules and grpcio ({_one_line(exc)}): "
                        "pip install noprop-fl (or grpcio grpcio-health-checking protobuf with noprop.proto)") from None
    return inference_pb2, inference_pb2_grpc


# -- the model ---------------------------------------------------------------------------------------------


class EdgeModel:
    """An exported model in an onnxruntime session, with its metadata and input checks."""

    def __init__(self, path: str | Path, threads: int | None = None, arena: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "does not exist"
            raise EdgeError(f"model file {self.path} {what}: pass the .onnx file noprop-export wrote")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: the CLI reports its own
        opts.enable_cpu_mem_arena = arena
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for damaged files
            raise EdgeError(f"{self.path} cannot be loaded as an ONNX model: corrupt or truncated, or made for a "
                            f"newer onnxruntime ({_one_line(exc, 120)}): copy or export it again") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, self.path)
        names = {i.name for i in self.session.get_inputs()}
        expected = {INPUT_NAME, NOISE_NAME} if self.info.mode == "stochastic" else {INPUT_NAME}
        if names != expected:
            raise EdgeError(f"{self.path}: graph inputs {sorted(names)} do not match its {self.info.mode} metadata "
                            f"({sorted(expected)}): export it again")
        self.size = self.path.stat().st_size
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def stochastic(self) -> bool:
        return self.info.mode == "stochastic"

    def check_images(self, images: np.ndarray, what: str = "input") -> np.ndarray:
        """[N, *input_shape] float32 (a single example gains the batch axis); wrong shapes are an EdgeError."""
        return check_array(images, self.info, what)

    def make_noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        t1, d = self.info.noise_shape
        return rng.standard_normal((t1, n, d), dtype=np.float32)

    def run(self, images: np.ndarray, noise: np.ndarray | None = None,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, classes], labels [N]). Stochastic models take noise [T + 1, N, d] or draw it from
        rng; with neither, from fresh entropy (not reproducible: pass rng for that)."""
        x = self.check_images(images)
        feeds = {INPUT_NAME: x}
        if self.stochastic:
            if noise is None:
                noise = self.make_noise(len(x), rng if rng is not None else np.random.default_rng())
            noise = np.ascontiguousarray(noise, dtype=np.float32)
            t1, d = self.info.noise_shape
            if noise.shape != (t1, len(x), d):
                raise EdgeError(f"noise has shape {list(noise.shape)}, the model needs [{t1}, {len(x)}, {d}] "
                                "([T + 1, N, d])")
            if not np.isfinite(noise).all():
                raise EdgeError("noise contains NaN or infinite values")
            feeds[NOISE_NAME] = noise
        elif noise is not None:
            raise EdgeError("this model is deterministic (exported with --mode deterministic): it takes no noise")
        try:
            probs, labels = self.session.run(list(OUTPUT_NAMES), feeds)
        except Exception as exc:
            raise EdgeError(f"onnxruntime failed on {self.path} ({_one_line(exc, 120)})") from None
        return probs, labels

    def run_batches(self, images: np.ndarray, batch_size: int = 256,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """run() over a large array in batches; stochastic noise comes from one seeded generator."""
        rng = np.random.default_rng(seed)
        probs, labels = [], []
        for start in range(0, len(images), batch_size):
            p, lab = self.run(images[start:start + batch_size], rng=rng)
            probs.append(p)
            labels.append(lab)
        return np.concatenate(probs), np.concatenate(labels)


# -- the block bundle: anytime and streamed inference (issue 26) -----------------------------------------


def bundle_path_for(onnx_path: str | Path) -> Path:
    """model.onnx -> model.blocks.zip (beside it): the per-block graphs noprop-export --blocks writes."""
    p = Path(onnx_path)
    return p.with_name(p.name.removesuffix(".onnx") + ".blocks.zip")


def block_file_name(t: int, T: int) -> str:
    return f"block-{t:0{max(2, len(str(T)))}d}.onnx"


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM; getrusage where /proc is missing), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def exit_scores(probs: np.ndarray, rule: str) -> np.ndarray:
    """A block's confidence per row, float32: max p_t (confidence) or its top-1 minus top-2 (margin)."""
    if rule == "confidence":
        return probs.max(axis=1)
    top2 = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]).astype(np.float32)


@dataclass(frozen=True)
class ExitRule:
    """When a row leaves the chain after block t < T: its score (exit_scores) at least `threshold`, or, for the
    rule "blocks", after `blocks` blocks. A row that never exits runs all T blocks and the head."""

    rule: str  # confidence | margin | blocks
    threshold: float = 1.0
    blocks: int = 0

    def describe(self) -> str:
        return f"after {self.blocks} blocks" if self.rule == "blocks" else f"{self.rule} >= {self.threshold:.6g}"

    def exits(self, probs: np.ndarray, t: int) -> np.ndarray:
        if self.rule == "blocks":
            return np.full(len(probs), t >= self.blocks)
        return exit_scores(probs, self.rule) >= np.float32(self.threshold)


def exit_simulation(per_block: np.ndarray, final: np.ndarray, rule: ExitRule) -> tuple[np.ndarray, np.ndarray]:
    """(labels, blocks used) of `rule` from every block's probabilities [T, N, K] and the head's [N, K]: what
    BlockBundle.run(..., rule) returns, computed from one pass over all blocks."""
    T, n = per_block.shape[:2]
    labels, used = final.argmax(axis=1), np.full(n, T)
    open_rows = np.ones(n, dtype=bool)
    for t in range(1, T):
        leave = open_rows & rule.exits(per_block[t - 1], t)
        labels[leave] = per_block[t - 1][leave].argmax(axis=1)
        used[leave] = t
        open_rows &= ~leave
    return labels, used


def in_gaps(scores: np.ndarray, candidates: int) -> np.ndarray:
    """Thresholds at `candidates` quantiles of `scores`, each halfway (in float32) between its score and the next
    lower one: the same rows pass as at the score itself, with room for a float's wobble either way. The lowest
    score's threshold sits halfway to 0."""
    values = np.unique(scores.astype(np.float32))
    picked = np.unique(np.quantile(scores.astype(np.float32), np.linspace(0, 1, candidates), method="nearest"))
    below = np.concatenate([[0.0], values])[np.searchsorted(values, picked)]
    return ((picked.astype(np.float64) + below) / 2).astype(np.float32)


def calibrate_exit(per_block: np.ndarray, final: np.ndarray, labels: np.ndarray,
                   max_loss_points: float = DEFAULT_MAX_LOSS_POINTS, candidates: int = 400) -> dict:
    """The exit threshold with the fewest blocks per example whose accuracy on (per_block, final, labels) is at
    most max_loss_points below the full chain's, for each rule in EXIT_RULES; the cheaper rule is the default.

    Candidates are quantiles of the scores of blocks 1..T-1, each moved down to halfway to the next lower score
    (so a row whose score is the candidate still leaves when another batch size or CPU computes it an ulp lower),
    and "never" (2.0: the full chain). Ties go to the higher threshold."""
    labels = np.asarray(labels)
    n, T = len(labels), per_block.shape[0]
    full_correct = int((final.argmax(axis=1) == labels).sum())
    allowed = max_loss_points * n / 100 + 1e-9  # correct answers the exit may lose
    result: dict = {"max_loss_points": float(max_loss_points), "examples": int(n), "T": int(T),
                    "full_accuracy": full_correct / n,
                    "block_accuracy": [float((p.argmax(axis=1) == labels).mean()) for p in per_block]}
    best = {}
    for rule in EXIT_RULES:
        scores = np.stack([exit_scores(p, rule) for p in per_block[:-1]]) if T > 1 else np.ones((0, n), np.float32)
        grid = in_gaps(scores, candidates) if T > 1 else []
        chosen = (2.0, float(T), full_correct)
        for tau in (float(v) for v in grid):
            pred, used = exit_simulation(per_block, final, ExitRule(rule, tau))
            correct, cost = int((pred == labels).sum()), float(used.mean())
            if full_correct - correct <= allowed and (cost, -tau) < (chosen[1], -chosen[0]):
                chosen = (tau, cost, correct)
        tau, cost, correct = chosen
        used = exit_simulation(per_block, final, ExitRule(rule, tau))[1]
        best[rule] = {"threshold": tau, "mean_blocks": cost, "accuracy": correct / n,
                      "loss_points": 100 * (full_correct - correct) / n,
                      "exits_per_block": np.bincount(used, minlength=T + 1)[1:].tolist()}
    rule = min(EXIT_RULES, key=lambda r: (best[r]["mean_blocks"], r != "confidence"))
    result.update(rule=rule, threshold=best[rule]["threshold"], mean_blocks=best[rule]["mean_blocks"],
                  accuracy=best[rule]["accuracy"], rules=best)
    return result


class BlockBundle:
    """A block bundle (noprop-export --blocks) in onnxruntime sessions, one per block.

    preload=True (anytime) keeps every block's session; preload=False (streamed) loads block t from the zip,
    runs it over all the rows, and drops it before block t + 1, so one block is in memory at a time.

    The manifest's readout says how rows are answered. chain: block t takes z_{t-1} from block t - 1, an exit
    answers with p_t, and the last block's head gives the full answer. ensemble (a federated checkpoint's): every
    block sees z = 0, so blocks need nothing from each other, and the answer after t blocks is the posterior
    softmax(mean over s <= t of log p_s); after all T it is the one-graph ensemble's.
    """

    def __init__(self, path: str | Path, threads: int | None = None, arena: bool = True, preload: bool = True):
        import zipfile

        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeError(f"block bundle {self.path} does not exist: export it with noprop-export --blocks")
        self.threads, self.arena = threads, arena
        try:
            self._zip = zipfile.ZipFile(self.path)
            self.manifest = json.loads(self._zip.read(BUNDLE_MANIFEST))
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise EdgeError(f"{self.path} is not a readable block bundle ({_one_line(exc, 100)}): export it again "
                            "with noprop-export --blocks") from None
        if self.manifest.get("format") != BUNDLE_FORMAT or self.manifest.get("format_version") != \
                BUNDLE_FORMAT_VERSION:
            raise EdgeError(f"{self.path} is a zip but not a noprop-fl block bundle of version "
                            f"{BUNDLE_FORMAT_VERSION}: export it again with noprop-export --blocks")
        self.info = ModelInfo.from_metadata(self.manifest.get("metadata", {}), self.path)
        self.blocks = self.manifest.get("blocks", [])
        if len(self.blocks) != self.info.T or self.info.mode != "deterministic":
            raise EdgeError(f"{self.path}: {len(self.blocks)} block graphs for T={self.info.T} "
                            f"({self.info.mode}): export it again")
        self.readout = self.manifest.get("readout", "chain")
        if self.readout not in BUNDLE_READOUTS:
            raise EdgeError(f"{self.path}: readout {self.readout!r} is none of {', '.join(BUNDLE_READOUTS)}: export "
                            "it again with this version's noprop-export --blocks")
        self.calibration: dict = self.manifest.get("anytime", {})
        self.size = self.path.stat().st_size
        self._sessions = [self._load(t) for t in range(1, self.info.T + 1)] if preload else None

    @property
    def T(self) -> int:
        return self.info.T

    def close(self) -> None:
        self._sessions = None
        self._zip.close()

    def _load(self, t: int) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = self.arena
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        name = self.blocks[t - 1]["file"]
        try:
            data = self._zip.read(name)  # the zip checks the member's CRC-32
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgeError(f"{self.path}: block {t} ({name}) cannot be loaded ({_one_line(exc, 120)}): export it "
                            "again") from None

    def session(self, t: int) -> ort.InferenceSession:
        return self._sessions[t - 1] if self._sessions is not None else self._load(t)

    def default_rule(self) -> ExitRule | None:
        """The calibrated exit rule, or None when the bundle records no calibration."""
        c = self.calibration
        if not c or c.get("rule") not in EXIT_RULES:
            return None
        return ExitRule(c["rule"], float(c["threshold"]))

    def _step(self, sess: ort.InferenceSession, x: np.ndarray, z: np.ndarray, last: bool,
              batch_size: int) -> list[np.ndarray]:
        names = list(BLOCK_OUTPUTS) + (list(OUTPUT_NAMES) if last else [])
        if len(x) <= batch_size:
            return sess.run(names, {BLOCK_INPUTS[0]: x, BLOCK_INPUTS[1]: z})
        parts = [sess.run(names, {BLOCK_INPUTS[0]: x[i:i + batch_size], BLOCK_INPUTS[1]: z[i:i + batch_size]})
                 for i in range(0, len(x), batch_size)]
        return [np.concatenate(col) for col in zip(*parts)]

    def run(self, images: np.ndarray, rule: ExitRule | None = None,
            batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities [N, classes], labels [N], blocks used [N]). Without a rule every row runs all T blocks
        and the head: the one-graph chain's answer. With one, a row leaves after block t < T when the rule says
        so, answered by p_t; block t + 1 runs only on the rows still open. Rows go through each session in
        batches of batch_size."""
        x = check_array(images, self.info)
        if rule is not None and rule.rule == "blocks" and not 1 <= rule.blocks <= self.T:
            raise EdgeError(f"--exit-after must be in 1 .. {self.T} (the model's blocks), got {rule.blocks}")
        n, T = len(x), self.T
        probs = np.empty((n, self.info.num_classes), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        used = np.full(n, T, dtype=np.int64)
        z = np.zeros((n, self.info.embedding_dim), dtype=np.float32)
        open_rows = np.arange(n)
        xa = x
        ensemble = self.readout == "ensemble"
        log_sum = np.zeros((n, self.info.num_classes), dtype=np.float64) if ensemble else None
        try:
            for t in range(1, T + 1):
                sess = self.session(t)
                out = self._step(sess, xa, np.zeros_like(z) if ensemble else z, t == T, batch_size)
                del sess  # streamed: the only reference; the block's memory goes here
                if ensemble:  # the answer so far: the first t blocks' ensemble, in p_t's place
                    log_sum += np.log(np.maximum(out[0], TINY))
                    out[0] = ensemble_posterior(log_sum, t)
                    if t == T:
                        out[2], out[3] = out[0], out[0].argmax(axis=1)
                if t == T:
                    probs[open_rows], labels[open_rows] = out[2], out[3]
                    break
                z = out[1]
                if rule is None:
                    continue
                leave = rule.exits(out[0], t)
                if leave.any():
                    rows = open_rows[leave]
                    probs[rows], labels[rows], used[rows] = out[0][leave], out[0][leave].argmax(axis=1), t
                    stay = ~leave
                    open_rows, xa, z = open_rows[stay], xa[stay], z[stay]
                    if ensemble:
                        log_sum = log_sum[stay]
                    if not len(open_rows):
                        break
        except EdgeError:
            raise
        except Exception as exc:
            raise EdgeError(f"onnxruntime failed on {self.path} ({_one_line(exc, 120)})") from None
        return probs, labels, used

    def all_block_probabilities(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(every block's p_t [T, N, K], the head's probabilities [N, K]) of the full chain: the calibration's
        input."""
        x = check_array(images, self.info)
        z = np.zeros((len(x), self.info.embedding_dim), dtype=np.float32)
        per_block, log_sum = [], np.zeros((len(x), self.info.num_classes), dtype=np.float64)
        for t in range(1, self.T + 1):
            out = self._step(self.session(t), x, z, t == self.T, batch_size)
            if self.readout == "ensemble":  # z stays 0; each block's answer is the ensemble so far
                log_sum += np.log(np.maximum(out[0], TINY))
                per_block.append(ensemble_posterior(log_sum, t))
            else:
                per_block.append(out[0])
                z = out[1]
        return np.stack(per_block), (per_block[-1] if self.readout == "ensemble" else out[2])

    def run_batches(self, images: np.ndarray, batch_size: int = 256, rule: ExitRule | None = None):
        """run() batch by batch (what a device answering requests of batch_size does)."""
        parts = [self.run(images[i:i + batch_size], rule, batch_size) for i in range(0, len(images), batch_size)]
        return tuple(np.concatenate(col) for col in zip(*parts))


def ensemble_posterior(log_sum: np.ndarray, t: int) -> np.ndarray:
    """softmax(log_sum / t) in float32: the geometric mean of t blocks' posteriors, normalised."""
    mean = log_sum / t
    e = np.exp(mean - mean.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def check_array(images: np.ndarray, info: ModelInfo, what: str = "input") -> np.ndarray:
    """[N, *input_shape] float32 (a single example gains the batch axis); wrong shapes are an EdgeError."""
    x = np.asarray(images)
    shape = info.input_shape
    if x.ndim == len(shape):
        x = x[None]
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise EdgeError(f"{what} has shape {list(x.shape)} but the model takes [N, {', '.join(map(str, shape))}]"
                        f" ({info.input_layout}, raw scale {info.input_scale})")
    if x.shape[0] < 1:
        raise EdgeError(f"{what} is an empty batch")
    if x.dtype.kind not in "fiub":
        raise EdgeError(f"{what} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise EdgeError(f"{what} contains NaN or infinite values")
    return x


# -- reading inputs ----------------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise EdgeError("reading image files needs Pillow: pip install pillow (or pass .npy arrays)") from None
    return Image, UnidentifiedImageError


def _to_model_layout(x: np.ndarray, shape: tuple[int, ...], batched: bool, where: str) -> np.ndarray:
    """Arrays in [H, W], [H, W, C] or [C, H, W] (with a leading N when batched) -> [(N,) C, H, W]."""
    lead = 1 if batched else 0
    body = tuple(x.shape[lead:])
    if body == shape:
        return x
    if len(shape) == 3:
        c, h, w = shape
        if c == 1 and body == (h, w):
            return np.expand_dims(x, lead)
        if body == (h, w, c):
            return np.moveaxis(x, -1, lead)
    expected = "[N, ...]" if batched else "one example"
    raise EdgeError(f"{where} has shape {list(x.shape)} but the model takes {expected} of "
                    f"{list(shape)} ({'C, H, W' if len(shape) == 3 else 'F'}; [H, W, C] and [H, W] are also read)")


def _scale(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 / 255, uint16 / 65535, floats and bools as they are."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    if x.dtype.kind in "fb":
        return x.astype(np.float32)
    if x.dtype.kind in "iu":
        raise EdgeError(f"{where} holds {x.dtype} values: save images as uint8 (0..255) or float in [0, 1]")
    raise EdgeError(f"{where} must be numeric, got dtype {x.dtype}")


def load_image(path: str | Path, input_shape: tuple[int, ...], resize: bool = False,
               convert: bool = False) -> np.ndarray:
    """One input file -> float32 [C, H, W] (or [F]) in raw scale, checked against the model's input shape.

    Image files (Pillow): the size and the channel count must match the model unless resize / convert allow
    adapting them; an RGB image whose three channels are equal counts as grayscale; alpha is dropped. .npy
    files hold one example ([H, W], [H, W, C], [C, H, W] or [F]; uint8 or float in [0, 1]).
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"input file {path} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise EdgeError(f"{path} is not a readable .npy array ({_one_line(exc, 100)})") from None
        return _to_model_layout(_scale(arr, str(path)), tuple(input_shape), False, str(path))
    if len(input_shape) != 3:
        raise EdgeError(f"the model takes feature vectors {list(input_shape)}, not images: pass {path.stem}.npy")
    image_mod, unidentified = _pil()
    c, h, w = input_shape
    names = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    try:
        with image_mod.open(path) as im:
            im.load()
            if im.mode in _GRAY_MODES:
                file_channels = 1
                if im.mode in ("1", "LA"):
                    im = im.convert("L")
            else:
                im = im.convert("RGB")
                rgb = np.asarray(im)
                file_channels = 1 if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else 3
                if file_channels == 1:
                    im = im.convert("L")  # exact: the weights of L sum to 1 and the channels are equal
            if file_channels != c:
                if not convert or c not in names:
                    hint = ": pass --convert to convert it" if c in names else ""
                    raise EdgeError(f"{path} is {names[file_channels]} but the model takes "
                                    f"{names.get(c, f'{c}-channel')} images{hint}")
                im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                if not resize:
                    raise EdgeError(f"{path} is {im.size[0]}x{im.size[1]} but the model takes {w}x{h} images: "
                                    "pass --resize to scale it")
                im = im.resize((w, h), image_mod.BILINEAR)
            arr = np.asarray(im)
    except (OSError, unidentified, ValueError) as exc:
        raise EdgeError(f"cannot read image {path} ({_one_line(exc, 100)})") from None
    if arr.dtype == np.int32:  # Pillow mode "I": 16-bit PNGs
        arr = arr.astype(np.uint16)
    x = _scale(arr, str(path))
    return x[None] if c == 1 else np.moveaxis(x, -1, 0)


def load_images(paths: list[str | Path], input_shape: tuple[int, ...], resize: bool = False,
                convert: bool = False) -> np.ndarray:
    if not paths:
        raise EdgeError("no input files given")
    return np.stack([load_image(p, input_shape, resize, convert) for p in paths]).astype(np.float32)


def load_eval_data(spec: str | Path, info: ModelInfo, limit: int | None = None, resize: bool = False,
                   convert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw inputs [N, ...] and labels [N] from an .npz (x_test, y_test or x, y), a folder of IDX test files
    (t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, optionally .gz: MNIST / Fashion-MNIST, e.g.
    data/FashionMNIST/raw), or a folder of class folders (DIR/test if it exists, else DIR; one subfolder per
    class, named as the model's class names).
    """
    path = Path(spec)
    idx = _find_idx(path) if path.is_dir() else None
    if idx is not None:
        x = _read_idx(idx[0], 3, where=str(idx[0]))
        y = _read_idx(idx[1], 1, where=str(idx[1])).astype(np.int64)
        if len(x) != len(y):
            raise EdgeError(f"{path}: {len(x)} images but {len(y)} labels in its IDX files")
        if len(y) and y.max() >= info.num_classes:
            raise EdgeError(f"{path}: labels outside 0..{info.num_classes - 1}")
        if limit:
            x, y = x[:limit], y[:limit]
        x = _to_model_layout(_scale(x, str(idx[0])), info.input_shape, True, str(idx[0]))
        return np.ascontiguousarray(x, dtype=np.float32), y
    if path.is_dir():
        root = path / "test" if (path / "test").is_dir() else path
        files, labels = [], []
        index = {name: i for i, name in enumerate(info.class_names)}
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise EdgeError(f"{root}: folders {', '.join(unknown[:5])} are not classes of the model "
                            f"({', '.join(info.class_names[:10])}{' ...' if info.num_classes > 10 else ''})")
        for folder in folders:
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"):
                    files.append(f)
                    labels.append(index[folder.name])
        if not files:
            raise EdgeError(f"{root} holds no images: expected one subfolder per class")
        if limit:
            files, labels = files[:limit], labels[:limit]
        return load_images(files, info.input_shape, resize, convert), np.asarray(labels, dtype=np.int64)
    if not path.is_file():
        raise EdgeError(f"evaluation data {path} does not exist: pass an .npz file or a folder of class folders")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xk, yk = ("x_test", "y_test") if {"x_test", "y_test"} <= keys else ("x", "y")
            if not {xk, yk} <= keys:
                raise EdgeError(f"{path}: needs arrays x_test, y_test (or x, y); found {sorted(keys) or 'none'}")
            x, y = z[xk], z[yk]
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in keys else None
    except EdgeError:
        raise
    except Exception as exc:
        raise EdgeError(f"{path} is not a readable .npz archive ({_one_line(exc, 100)}): write it with np.savez") \
            from None
    if classes is not None and classes != info.class_names:
        raise EdgeError(f"{path}: its classes {classes[:5]} differ from the model's {info.class_names[:5]}")
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind not in "iu" or len(y) != len(x):
        raise EdgeError(f"{path}: {yk} must hold one integer label per row of {xk}")
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise EdgeError(f"{path}: labels outside 0..{info.num_classes - 1}")
    if limit:
        x, y = x[:limit], y[:limit]
    x = _to_model_layout(_scale(x, str(path)), info.input_shape, True, f"{path} [{xk}]")
    if info.input_layout == "NCHW" and x.size and (x.min() < -0.01 or x.max() > 1.01):
        raise EdgeError(f"{path}: {xk} holds values in [{x.min():.3g}, {x.max():.3g}] but the model takes raw "
                        "pixels in [0, 1] (uint8 / 255), not normalised ones")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path) -> tuple[Path, Path] | None:
    for base in (folder, folder / "raw"):
        found = []
        for name in _IDX_TEST:
            candidates = [base / name, base / f"{name}.gz"]
            found.append(next((c for c in candidates if c.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def _read_idx(path: Path, ndim: int, where: str) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format): magic 0x0000 08 <ndim>, big-endian sizes, data."""
    import gzip

    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise EdgeError(f"cannot read {where} ({_one_line(exc, 100)})") from None
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise EdgeError(f"{where} is not an IDX file of {ndim}-dimensional unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise EdgeError(f"{where} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


# -- CLI ---------------------------------------------------------------------------------------------------


def _print_predictions(results: list[dict], as_json: bool, seed: int | None = None, drawn: bool = False) -> None:
    """seed: of a stochastic model's noise; in every JSON row, and on stderr when drawn (the user gave none)."""
    if seed is not None:
        results = [{**r, "seed": seed} for r in results]
        if drawn:
            print(f"noprop-edge: noise seed {seed} (pass --seed {seed} to repeat this)", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['file']}\t{r['label']}\t{r['class']}\t{r['probability']:.4f}")


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


def _exit_rule(args: argparse.Namespace, bundle: BlockBundle) -> ExitRule | None:
    """The exit rule of --mode anytime / streamed: --exit-after, --threshold (with --rule or the calibrated rule),
    or the bundle's calibrated rule (anytime only); streamed runs the full chain unless told otherwise."""
    if args.exit_after is not None:
        if args.threshold is not None:
            raise EdgeError("--exit-after and --threshold are two exit rules: give one")
        if not 1 <= args.exit_after <= bundle.T:
            raise EdgeError(f"--exit-after must be in 1 .. {bundle.T} (the model's blocks), got {args.exit_after}")
        return ExitRule("blocks", blocks=args.exit_after)
    if args.threshold is not None:
        calibrated = bundle.default_rule()
        return ExitRule(args.rule or (calibrated.rule if calibrated else "confidence"), args.threshold)
    if args.rule is not None:
        raise EdgeError("--rule needs --threshold (the calibrated rule comes with its own threshold)")
    if args.mode == "streamed":
        return None
    rule = bundle.default_rule()
    if rule is None:
        raise EdgeError(f"{bundle.path} records no exit calibration: pass --threshold P or --exit-after K, or "
                        "export again with noprop-export --blocks (which calibrates on held-out images)")
    return rule


def _open_model(args: argparse.Namespace) -> EdgeModel | BlockBundle:
    """The one-graph model (--mode full on an .onnx) or the block bundle (anytime, streamed, or a bundle given)."""
    path = Path(args.model)
    if args.mode == "full" and (args.threshold is not None or args.exit_after is not None or args.rule):
        raise EdgeError("--threshold, --rule and --exit-after need --mode anytime or streamed")
    given_bundle = path.is_file() and path.suffix == ".zip"
    if args.mode == "full" and not given_bundle and not args.bundle:
        return EdgeModel(path, threads=args.threads, arena=not args.no_arena)
    bundle = Path(args.bundle) if args.bundle else path if given_bundle else bundle_path_for(path)
    if not bundle.is_file():
        raise EdgeError(f"--mode {args.mode} needs the block bundle {bundle}, which does not exist: export the "
                        "checkpoint with noprop-export --blocks (NoProp-DT), or pass --bundle")
    return BlockBundle(bundle, threads=args.threads, arena=not args.no_arena, preload=args.mode != "streamed")


def _format_info(model: EdgeModel) -> str:
    info = model.info
    lines = [f"{model.path}  ({model.size / 1e6:.2f} MB, sha256 {model.sha256[:16]}...)"]
    manifest = manifest_path_for(model.path)
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
        ("format", f"{FORMAT} v{FORMAT_VERSION}, noprop-fl {info.noprop_fl_version}, {info.exporter}, "
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
    (noprop.ops.cli has the same class; this file stays importable on its own, without the noprop package.)"""

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
        sp.add_argument("--rule", choices=EXIT_RULES,
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
    sp.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                    help=f"port (default: {DEFAULT_PORT}; 0 = any free)")
    sp.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                    help="larger requests get RESOURCE_EXHAUSTED (default: 4 MiB)")
    sp.add_argument("--workers", type=int, default=4, metavar="N", help="request threads (default: 4)")
    sp.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                    help=f"calls in progress or queued; more get RESOURCE_EXHAUSTED (default: "
                         f"{DEFAULT_MAX_CONCURRENT})")
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
        raise EdgeError("--threads must be at least 1")
    if args.command == "serve":
        from noprop.deploy.edge_service import serve_command

        return serve_command(args)
    if args.command == "info":
        if Path(args.model).suffix == ".zip":
            bundle = BlockBundle(args.model, preload=False)
            print(json.dumps({k: v for k, v in bundle.manifest.items() if k != "metadata"}, indent=2) if args.json
                  else f"{bundle.path}  ({bundle.size / 1e6:.2f} MB block bundle of {bundle.T} blocks, "
                       f"read out by the {bundle.readout})\n  "
                       f"{bundle.info.summary()}\n  anytime       "
                       + (json.dumps({k: v for k, v in bundle.calibration.items() if k != "rules"})
                          if bundle.calibration else "not calibrated"))
            return 0
        model = EdgeModel(args.model, threads=args.threads, arena=not args.no_arena)
        if args.json:
            print(manifest_json(model.info, model.path), end="")
        else:
            print(_format_info(model))
        return 0
    if args.command == "eval" and args.batch_size < 1:
        raise EdgeError("--batch-size must be at least 1")
    model = _open_model(args)
    rule = _exit_rule(args, model) if isinstance(model, BlockBundle) else None
    if args.command == "predict":
        x = load_images(args.images, model.info.input_shape, args.resize, args.convert)
        extra: list[dict] = [{} for _ in args.images]
        if isinstance(model, BlockBundle):
            probs, labels, used = model.run(x, rule)
            extra = [{"blocks": int(u)} for u in used]
            seed = None
        else:
            seed = _resolve_seed(model, args.seed)
            probs, labels = model.run(x, rng=np.random.default_rng(seed))
        _print_predictions([{"file": f, "label": int(lab), "class": model.info.class_names[int(lab)],
                             "probability": float(p[lab]), **e}
                            for f, p, lab, e in zip(args.images, probs, labels, extra, strict=True)], args.json,
                           seed, drawn=args.seed is None)
        return 0
    if args.command == "eval":
        x, y = load_eval_data(args.data, model.info, args.limit, args.resize, args.convert)
        extra = {}
        if isinstance(model, BlockBundle):
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
                  **extra, "peak_rss_mb": peak_rss_mb()}
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


def _resolve_seed(model: EdgeModel, seed: int | None) -> int | None:
    """The seed of a stochastic model's noise: the given one, else a fresh one; None for a deterministic model."""
    if not model.stochastic:
        return None
    return seed if seed is not None else fresh_seed()


def _package_edge(command: str) -> ModuleType:
    """This module as the noprop-fl package holds it, where serve and query run: their modules import it, and the
    errors they raise must be the classes main catches. Run as `python -m` or as a script (a lone copy, say), this
    file is another module (__main__) or has no package beside it."""
    try:
        from noprop.deploy import edge
    except ImportError as exc:
        raise EdgeError(f"{command} needs the noprop-fl package ({_one_line(exc)}): pip install noprop-fl; this file "
                        "alone runs info, predict and eval") from None
    return edge


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("serve", "query") and __name__ != "noprop.deploy.edge":
            return _package_edge(args.command).main(argv)
        return _run(args)
    except EdgeError as exc:  # and edge_client.RemoteError, a failed call: exit 1
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
