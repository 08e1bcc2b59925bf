"""int8 quantization of an exported model with onnxruntime: dynamic (the default) or static QDQ.

dynamic (issue 26): onnxruntime.quantization.quantize_dynamic on the MatMul and Gemm nodes (the Linear layers,
BatchNorm already folded in by the exporter), int8 weights per output channel; each call quantizes its
activations on the fly (DynamicQuantizeLinear -> MatMulInteger). The convolutions stay float32. Why: profiled
at batch 1 on the quickstart width (onnxruntime's profiler, 1 thread), the FC layers of a block (the conv path's
3136 x 256 FC first) take about 2/3 of its time and hold about 95% of its weights: at batch 1 they are bound by
reading their weights, which int8 quarters. Static QDQ quantizes the convs too but puts a QuantizeLinear /
DequantizeLinear pair around every quantized node (92 Q and 142 DQ nodes in a 10-block chain, ~28% of its time),
and ReLU / MaxPool between them run in NHWC int8 with reorders: that is why it was only 1.2x faster. Dynamic
Conv (ConvInteger) measured slower than float32 Conv (0.73x a block) and is left out. No calibration data.

static: QDQ format (QuantizeLinear / DequantizeLinear pairs that onnxruntime fuses into integer kernels), int8
weights per output channel, uint8 activations per tensor, calibrated with MinMax on N training images. The images
are fed in raw pixel scale ([0, 1]), because the normalisation is part of the graph: they are the training split
of the checkpoint's dataset (noprop.data.load_dataset), un-normalised with its own mean and std. Only Conv and
Gemm are quantized.

Either way the chain's arithmetic between blocks (softmax(logits) @ W, the schedule's a_t u + b_t z, the noise)
stays float32, which is what keeps the accuracy. The model is first run through onnxruntime's quant_pre_process
(shape inference and graph clean-up), as onnxruntime's documentation advises.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from noprop.deploy.edge import INPUT_NAME, NOISE_NAME, ModelInfo
from noprop.deploy.export import ExportError, make_readable, read_metadata, set_metadata
from noprop.io import atomic_write

QUANTIZED_OPS = ("Conv", "Gemm")  # static
DYNAMIC_OPS = ("MatMul", "Gemm")
SCHEMES = ("dynamic", "static")
DEFAULT_SCHEME = "dynamic"
DEFAULT_CALIBRATION = 512


def calibration_images(dataset: str, n: int = DEFAULT_CALIBRATION, root: str | os.PathLike | None = None,
                       seed: int = 0, expect_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """n training images of `dataset` (seeded choice), float32 in raw scale (what the exported graph takes)."""
    import torch

    from noprop.data import load_dataset

    if n < 1:
        raise ExportError(f"--calibration must be at least 1 image, got {n}")
    data = load_dataset(dataset, "train", root=root)
    if expect_shape is not None and tuple(data.input_shape) != tuple(expect_shape):
        raise ExportError(f"calibration data {dataset!r} has examples {list(data.input_shape)} but the model takes "
                          f"{list(expect_shape)}: pass the model's dataset with --data")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    x = data.x[idx]
    view = (1, -1, *([1] * (x.ndim - 2)))
    raw = x * torch.tensor(data.std, dtype=torch.float32).view(view) + torch.tensor(data.mean).view(view)
    return np.ascontiguousarray(raw.numpy(), dtype=np.float32)


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds raw images (and, for stochastic models, seeded standard-normal noise) in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 32, noise_shape: tuple[int, int] | None = None,
                 seed: int = 0):
        self.images = images
        self.batch_size = batch_size
        self.noise_shape = noise_shape
        self.seed = seed
        self.rewind()

    def rewind(self) -> None:
        self._start = 0
        self._rng = np.random.default_rng(self.seed)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start:self._start + self.batch_size]
        self._start += self.batch_size
        feeds = {INPUT_NAME: batch}
        if self.noise_shape is not None:
            t1, d = self.noise_shape
            feeds[NOISE_NAME] = self._rng.standard_normal((t1, len(batch), d), dtype=np.float32)
        return feeds

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)


def quantize_model(fp32_path: str | os.PathLike, out: str | os.PathLike, images: np.ndarray | None = None,
                   batch_size: int = 32, seed: int = 0, dataset: str = "", scheme: str = "static") -> Path:
    """fp32 .onnx (from noprop-export) -> int8 .onnx at `out` (atomic), metadata carried over. scheme "static"
    (QDQ, calibrated on `images`) or "dynamic" (MatMul / Gemm only; images unused)."""
    fp32_path = Path(fp32_path)
    info = ModelInfo.from_metadata(read_metadata(fp32_path), fp32_path)
    if scheme not in SCHEMES:
        raise ExportError(f"--int8-scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "static" and (images is None or images.ndim != len(info.input_shape) + 1
                               or tuple(images.shape[1:]) != info.input_shape):
        shape = "none" if images is None else list(images.shape)
        raise ExportError(f"calibration images are {shape}, the model takes "
                          f"[N, {', '.join(map(str, info.input_shape))}]")
    with tempfile.TemporaryDirectory(prefix="noprop-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quantized = Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        if scheme == "dynamic":
            _quantize_dynamic(pre, quantized)
        else:
            reader = ImageCalibrationReader(images, batch_size,
                                            info.noise_shape if info.mode == "stochastic" else None, seed)
            quantize_static(str(pre), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=False)
        proto = onnx.load(str(quantized))
    info.precision = "int8"
    if scheme == "dynamic":
        info.quantization = dynamic_record()
    else:
        info.quantization = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                             "weights": "int8 per-channel", "activations": "uint8 per-tensor",
                             "ops": list(QUANTIZED_OPS), "calibration": "MinMax",
                             "calibration_images": int(len(images)), "calibration_data": dataset, "seed": seed}
    set_metadata(proto, info.to_metadata())
    proto.producer_name = "noprop-fl"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    return make_readable(atomic_write(out, lambda f: f.write(data)))


def dynamic_record() -> dict:
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "format": "dynamic (MatMulInteger)",
            "weights": "int8 per-channel", "activations": "uint8 per-tensor, quantized per call",
            "ops": list(DYNAMIC_OPS), "float32": "Conv and the chain's arithmetic between blocks"}


def _quantize_dynamic(pre: Path, out: Path) -> None:
    quantize_dynamic(str(pre), str(out), op_types_to_quantize=list(DYNAMIC_OPS), per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=False)


def quantize_block_graph(fp32_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """One block graph of a bundle (noprop.deploy.blocks) -> int8, dynamic (MatMul / Gemm), metadata kept."""
    fp32_path, out = Path(fp32_path), Path(out)
    meta = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="noprop-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        _quantize_dynamic(pre, Path(tmp) / "int8.onnx")
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    set_metadata(proto, meta)
    proto.producer_name = "noprop-fl"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    return make_readable(atomic_write(out, lambda f: f.write(data)))
