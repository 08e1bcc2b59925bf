"""The edge runtime: run an exported NoProp model with onnxruntime and numpy alone, from this one file.

It imports numpy and onnxruntime, nothing else at import time: never torch, never the rest of noprop (noprop.proto
only for the manifest as JSON). Copied alone onto a device: `import edge; edge.EdgeModel("m.onnx").predict(x)`.
The command line (noprop-edge) is edge_cli.py, with edge_data.py: copy both beside it for `python edge_cli.py`.

The model file (written by noprop-export) takes `image` float32 [N, C, H, W] (or [N, F]) in raw pixel scale,
values in [0, 1] (uint8 / 255), and normalises inside the graph with the training set's mean and std; in
stochastic mode it also takes `noise` float32 [T + 1, N, d]. It returns `probabilities` [N, classes] and
`label` int64 [N]. Its metadata_props describe it (ModelInfo below; the same fields as the ModelManifest
message of proto/noprop/v1/inference.proto).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT = "noprop-fl/onnx-model"
FORMAT_VERSION = 1
INPUT_SCALE = "[0, 1]"  # raw pixels: uint8 / 255
MODES = ("deterministic", "stochastic")
PRECISIONS = ("fp32", "int8")
EXIT_RULES = ("confidence", "margin")  # on the current block's posterior p_t: max p_t, or top-1 minus top-2
BUNDLE_FORMAT = "noprop-fl/block-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_MANIFEST = "manifest.json"
BLOCK_INPUTS = ("image", "z")  # of each block graph: raw image, z_{t-1}
BLOCK_OUTPUTS = ("block_probabilities", "z_next")  # p_t and z_t; the last block adds OUTPUT_NAMES
BUNDLE_READOUTS = ("chain", "ensemble")  # what a bundle's rows are answered by (the manifest's "readout")
TINY = float(np.finfo(np.float32).tiny)  # log p_t's floor for the ensemble: a float32 softmax can underflow to 0
INPUT_NAME, NOISE_NAME = "image", "noise"
OUTPUT_NAMES = ("probabilities", "label")
SERVICE_NAME = "noprop.v1.Inference"
DEFAULT_PORT = 50051
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONCURRENT = 64  # calls in progress or queued; more get RESOURCE_EXHAUSTED (bench/load_edge.py)
DRAWN_SEED_LIMIT = 2**53  # a seed drawn for an unseeded request stays exact as a JSON number (a double)

_MAX_MESSAGE = 200


class EdgeError(Exception):
    """A user-facing failure with a one-line message naming the file and the fix."""

    exit_code = 2  # bad input


def one_line(exc: object, limit: int = _MAX_MESSAGE) -> str:
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
            raise EdgeError(f"{where} has damaged noprop-fl metadata ({type(exc).__name__}: {one_line(exc)}): "
                            "export it again") from None
        if info.mode not in MODES or len(info.input_shape) not in (1, 3) or info.num_classes < 2:
            raise EdgeError(f"{where} has inconsistent noprop-fl metadata (mode {info.mode!r}, input "
                            f"{list(info.input_shape)}, {info.num_classes} classes): export it again")
        return info

    def to_manifest(self, file_name: str = "", file_sha256: str = "", file_bytes: int = 0, fmt: str = FORMAT):
        """The ModelManifest message (needs protobuf and noprop.proto)."""
        pb = proto_modules()[0]
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
        m.schedule.kind, m.schedule.T = str(sched.get("kind", "cosine")), int(sched.get("T", self.T))
        m.schedule.s, m.schedule.clip = float(sched.get("s", 0.0)), float(sched.get("clip", 0.0))
        for key in ("max_delta_snr", "gamma0", "gamma1"):  # optional: set only when the schedule has them
            if sched.get(key) is not None:
                setattr(m.schedule, key, float(sched[key]))
        m.schedule.alpha_bar.extend(float(v) for v in sched.get("alpha_bar", ()))
        # through JSON: keys become strings, tuples lists (what a protobuf Struct accepts)
        m.training_metrics.update(json.loads(json.dumps(self.training_metrics)))
        if self.quantization:
            m.quantization.update(json.loads(json.dumps(self.quantization)))
        return m


def manifest_json(info: ModelInfo, path: str | Path | None = None, fmt: str = FORMAT) -> str:
    """The ModelManifest as JSON (proto3 JSON mapping, field names as in the .proto); with the SHA-256 and size of
    the file at `path` when given."""
    from google.protobuf import json_format

    file_args = (Path(path).name, file_sha256(path), Path(path).stat().st_size) if path is not None else ()
    message = info.to_manifest(*file_args, fmt=fmt)
    return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True, indent=2) + "\n"


def proto_modules():
    try:
        from noprop.proto import inference_pb2, inference_pb2_grpc
    except ImportError as exc:
        raise EdgeError(f"this needs noprop-fl's generated protocol modules and grpcio ({one_line(exc)}): "
                        "pip install noprop-fl (or grpcio grpcio-health-checking protobuf with noprop.proto)") from None
    return inference_pb2, inference_pb2_grpc


# -- the model ---------------------------------------------------------------------------------------------


def _session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the CLI reports its own
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class EdgeModel:
    """An exported model in an onnxruntime session, with its metadata and input checks."""

    def __init__(self, path: str | Path, threads: int | None = None, arena: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "does not exist"
            raise EdgeError(f"model file {self.path} {what}: pass the .onnx file noprop-export wrote")
        try:
            self.session = ort.InferenceSession(str(self.path), _session_options(threads, arena),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for damaged files
            raise EdgeError(f"{self.path} cannot be loaded as an ONNX model: corrupt or truncated, or made for a "
                            f"newer onnxruntime ({one_line(exc, 120)}): copy or export it again") from None
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
            raise EdgeError(f"onnxruntime failed on {self.path} ({one_line(exc, 120)})") from None
        return probs, labels

    def predict(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The labels [N] of run(): a single example or a batch in the model's layout, raw scale [0, 1]."""
        return self.run(images, rng=rng)[1]

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
            raise EdgeError(f"{self.path} is not a readable block bundle ({one_line(exc, 100)}): export it again "
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
        opts = _session_options(self.threads, self.arena)
        name = self.blocks[t - 1]["file"]
        try:
            data = self._zip.read(name)  # the zip checks the member's CRC-32
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EdgeError(f"{self.path}: block {t} ({name}) cannot be loaded ({one_line(exc, 120)}): export it "
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
            raise EdgeError(f"onnxruntime failed on {self.path} ({one_line(exc, 120)})") from None
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


if __name__ == "__main__":  # the runtime imports no command line (no circle): say where it is, in one line
    print("edge.py is the runtime (import edge); its command line is edge_cli.py: copy it and edge_data.py beside "
          "this file and run python edge_cli.py, or noprop-edge where the package is installed", file=sys.stderr)
    sys.exit(2)
