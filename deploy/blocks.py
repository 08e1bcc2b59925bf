"""Export a NoProp-DT checkpoint as a block bundle: one ONNX graph per block in one file, for anytime and
block-streamed inference with noprop-edge (issue 26).

Block t's graph takes `image` (raw pixels, normalised inside as in the one-graph export) and `z` = z_{t-1}
[N, d] and returns `block_probabilities` p_t = softmax(block t's logits) [N, classes] and `z_next` = z_t of the
deterministic step z_t = a_t p_t W + b_t z_{t-1}. The last block also returns the head's `probabilities` and
`label`, so running every block gives exactly the chain of the one-graph export. z_0 = 0 (deterministic mode).
A checkpoint that reads out the ensemble (a federated one) exports the same graphs, and the manifest's `readout`
tells the runtime to give every block z = 0 and to answer by the mean of the blocks' log p_t so far.

Why one graph per block driven by the runtime, and not ONNX control flow (If / Loop) in one graph:
  - the exit is per example: the runtime runs block t only on the rows still undecided, so a batch shrinks as
    its easy examples leave; an If in the graph decides for a whole batch at once;
  - the same graphs serve streaming (load, run, drop one block at a time), which one graph cannot;
  - the price, T session calls instead of one, was measured: bench/inference.py reports the all-blocks chain
    driven by the runtime against the one-graph export (BENCHMARKS.md, "Anytime and streamed inference").

The bundle is an uncompressed zip (stdlib zipfile on the device): manifest.json (the model's metadata, each
block file's SHA-256, the exit calibration) and block-01.onnx .. block-TT.onnx. A member is read on its own, so
streaming holds one block's bytes at a time. The anytime threshold is calibrated here on held-out labelled
images (by default the last half of the dataset's test split, at most 5000 images: `noprop-edge eval --limit`
of the first half stays untouched) with the bundle's own onnxruntime graphs, so what is recorded is what the
device computes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

import noprop
from noprop.checkpoint import Checkpoint
from noprop.deploy.calibration import DEFAULT_MAX_LOSS_POINTS, calibrate_exit
from noprop.deploy.edge import (
    BLOCK_INPUTS,
    BLOCK_OUTPUTS,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_MANIFEST,
    EXIT_RULES,
    INPUT_NAME,
    OUTPUT_NAMES,
    BlockBundle,
    file_sha256,
)
from noprop.deploy.export import DEFAULT_OPSET, ExportError, _build, fold_batchnorm, model_info, set_metadata
from noprop.io import atomic_write

DEFAULT_HOLDOUT = 5000


def block_file_name(t: int, T: int) -> str:
    """block-01.onnx .. block-TT.onnx: the bundle's member of block t (the manifest names each)."""
    return f"block-{t:0{max(2, len(str(T)))}d}.onnx"


class BlockStep(nn.Module):
    """Block t of a NoProp-DT chain as its own graph: (raw image, z_{t-1}) -> (p_t, z_t[, head probs, label])."""

    def __init__(self, model: nn.Module, t: int, mean: list[float], std: list[float], input_shape: tuple[int, ...]):
        super().__init__()
        self.model, self.t, self.last = model, t, t == model.T
        view = (1, -1, 1, 1) if len(input_shape) == 3 else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(view))

    def forward(self, image: torch.Tensor, z: torch.Tensor):
        m = self.model
        x = (image - self.mean) / self.std
        probs = F.softmax(m.block_logits(self.t, x, z), dim=1)
        W = m.embedding.weight
        z_next = m.schedule.step(self.t, probs @ W, z, None)
        if not self.last:
            return probs, z_next
        final = F.softmax(m.head(z_next, W), dim=1)
        return probs, z_next, final, final.argmax(dim=1)


def check_bundle_checkpoint(ckpt: Checkpoint, mode: str = "deterministic") -> None:
    if ckpt.method != "dt":
        raise ExportError(f"--blocks exports NoProp-DT chains; this is a {ckpt.method} checkpoint (the one-graph "
                          "export is all it has)")
    if mode != "deterministic":
        raise ExportError("--blocks exports deterministic chains only (z_0 = 0, no noise): leave --mode out")


def export_block_graphs(ckpt: Checkpoint, folder: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """block-01.onnx .. block-TT.onnx in `folder` (fp32, BatchNorm folded), one per block."""
    check_bundle_checkpoint(ckpt)
    model = fold_batchnorm(copy.deepcopy(_build(ckpt)).eval())
    info = model_info(ckpt, opset=opset, model=model)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, *info.input_shape, generator=gen)
    z = torch.zeros(2, info.embedding_dim)
    paths = []
    for t in range(1, info.T + 1):
        step = BlockStep(model, t, info.mean, info.std, info.input_shape).eval()
        outputs = list(BLOCK_OUTPUTS) + (list(OUTPUT_NAMES) if t == info.T else [])
        names = list(BLOCK_INPUTS)
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(step, (image, z), buf, dynamo=False, input_names=names, output_names=outputs,
                              dynamic_axes={n: {0: "N"} for n in names + outputs}, opset_version=opset,
                              do_constant_folding=True)
            if t == 1:
                z = step(image, z)[1]  # a realistic z for the next block's trace (values do not matter)
        proto = onnx.load_from_string(buf.getvalue())
        proto.producer_name, proto.producer_version = "noprop-fl", noprop.__version__
        set_metadata(proto, {"block": str(t), "T": str(info.T)})
        onnx.checker.check_model(proto, full_check=True)
        path = folder / block_file_name(t, info.T)
        path.write_bytes(proto.SerializeToString())
        paths.append(path)
    return paths


def bundle_readout(ckpt: Checkpoint) -> str:
    """chain or ensemble: how the bundle's runtime answers, the checkpoint's own readout (the graphs are the same)."""
    return getattr(ckpt.config, "readout", "chain")


def write_bundle(out: str | os.PathLike, metadata: dict[str, str], block_paths: list[Path],
                 anytime: dict | None = None, readout: str = "chain") -> Path:
    """The zip of manifest.json and the block graphs, written atomically."""
    blocks = [{"t": t, "file": p.name, "sha256": file_sha256(p), "bytes": p.stat().st_size}
              for t, p in enumerate(block_paths, start=1)]
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "metadata": metadata,
                "inputs": list(BLOCK_INPUTS), "outputs": list(BLOCK_OUTPUTS), "last_outputs": list(OUTPUT_NAMES),
                "blocks": blocks, "readout": readout, **({"anytime": anytime} if anytime else {})}

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(BUNDLE_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for p in block_paths:
                zf.write(p, p.name)

    from noprop.deploy.export import make_readable

    return make_readable(atomic_write(out, write))


def read_bundle_members(path: str | os.PathLike, folder: Path) -> tuple[dict, list[Path]]:
    """Unpack a bundle's block graphs into `folder`: (manifest, paths)."""
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(BUNDLE_MANIFEST))
        paths = []
        for b in manifest["blocks"]:
            p = folder / b["file"]
            p.write_bytes(zf.read(b["file"]))
            paths.append(p)
    return manifest, paths


def holdout_images(dataset: str, n: int = DEFAULT_HOLDOUT, root: str | os.PathLike | None = None,
                   expect_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The last min(n, half) images of `dataset`'s test split in raw scale, their labels, and where they are from."""
    from noprop.data import load_dataset

    if n < 1:
        raise ExportError(f"--holdout must be at least 1 image, got {n}")
    data = load_dataset(dataset, "test", root=root)
    if expect_shape is not None and tuple(data.input_shape) != tuple(expect_shape):
        raise ExportError(f"holdout data {dataset!r} has examples {list(data.input_shape)} but the model takes "
                          f"{list(expect_shape)}: pass the model's dataset with --data")
    total = len(data)
    n = min(n, total // 2) if total >= 2 else total
    start = total - n
    x = data.x[start:]
    view = (1, -1, *([1] * (x.ndim - 2)))
    raw = x * torch.tensor(data.std, dtype=torch.float32).view(view) + torch.tensor(data.mean).view(view)
    source = {"data": dataset, "split": "test", "range": [start, total]}
    return np.ascontiguousarray(raw.numpy(), dtype=np.float32), data.y[start:].numpy().astype(np.int64), source


def calibrate_bundle(bundle: str | os.PathLike, images: np.ndarray, labels: np.ndarray, source: dict,
                     max_loss_points: float = DEFAULT_MAX_LOSS_POINTS) -> dict:
    """Calibrate the exit threshold on (images, labels) with the bundle's own graphs; rewrite the bundle with it."""
    if not 0 <= max_loss_points <= 100:
        raise ExportError(f"--anytime-loss must be in 0 .. 100 points, got {max_loss_points}")
    chain = BlockBundle(bundle, threads=1)
    per_block, final = chain.all_block_probabilities(images)
    chain.close()
    anytime = calibrate_exit(per_block, final, labels, max_loss_points)
    anytime.update(calibration=source)
    with tempfile.TemporaryDirectory(prefix="noprop-bundle-") as tmp:
        manifest, paths = read_bundle_members(bundle, Path(tmp))
        write_bundle(bundle, manifest["metadata"], paths, anytime, manifest.get("readout", "chain"))
    return anytime


def quantize_block_graphs(paths: list[Path], folder: Path) -> list[Path]:
    """Each block graph through noprop.deploy.quantize.quantize_block_graph (int8), into `folder`."""
    from noprop.deploy.quantize import quantize_block_graph

    folder.mkdir(parents=True, exist_ok=True)
    return [quantize_block_graph(p, folder / p.name) for p in paths]


__all__ = ["DEFAULT_HOLDOUT", "EXIT_RULES", "INPUT_NAME", "BlockStep", "calibrate_bundle", "export_block_graphs",
           "holdout_images", "quantize_block_graphs", "write_bundle"]
