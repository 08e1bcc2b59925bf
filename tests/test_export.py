"""noprop-export: parity of the ONNX file with PyTorch, its metadata and manifest, int8, and its errors.

The helpers at the top (a synthetic task as .npz, tiny trained checkpoints) are shared with test_edge.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import json_format
from synthetic import synthetic_arrays

import noprop
from noprop.baseline import BackpropChain
from noprop.checkpoint import Checkpoint, save_checkpoint
from noprop.data import load_train_test
from noprop.deploy import export_cli
from noprop.deploy.edge import EdgeModel, ModelInfo, file_sha256, manifest_path_for
from noprop.deploy.export import ExportError, export_onnx, read_metadata
from noprop.deploy.export_cli import export_checkpoint
from noprop.methods import build_model
from noprop.model import prototype_rows, scale_prototypes
from noprop.model_configs import NoPropConfig
from noprop.proto import inference_pb2
from noprop.trainer import BlockTrainer, OptimConfig, evaluate_accuracy, train_end_to_end_epoch

TINY = {"input_shape": (1, 12, 12), "num_classes": 4, "T": 3, "channels": (8, 16, 16), "hidden": 64, "dropout": 0.0}


def write_task(folder) -> str:
    """The synthetic task as an .npz (uint8 images, so raw pixels are x / 255); returns its dataset name."""
    path = folder / "task.npz"
    if not path.exists():
        x, y = synthetic_arrays(600, seed=1)
        xt, yt = synthetic_arrays(200, seed=2)
        np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, classes=np.array(["top", "mid", "low", "base"]))
    return f"npz:{path}"


def task_images(folder) -> tuple[np.ndarray, np.ndarray]:
    """Raw test images [N, 1, 12, 12] in [0, 1] and labels."""
    with np.load(folder / "task.npz") as z:
        return (z["x_test"][:, None] / 255.0).astype(np.float32), z["y_test"]


def tiny_checkpoint(folder, method: str = "dt", embedding: str = "one-hot", head: str = "softmax",
                    epochs: int = 2, name: str | None = None, z_path: str = "conv") -> tuple:
    """Train a tiny model on the synthetic task for a few epochs; save it. -> (path, Checkpoint).

    z_path "linear" builds prototypes as noprop-train's dt default does: unit rows, the FC z path."""
    torch.manual_seed(0)
    dataset = write_task(folder)
    train, test = load_train_test(dataset)
    init, lr_scale = None, 1.0
    if embedding == "prototype":
        init, lr_scale = scale_prototypes(prototype_rows(train.x, train.y, TINY["num_classes"]),
                                          "unit" if z_path == "linear" else "image")
    cfg = NoPropConfig(**{**TINY, "embedding": embedding, "head": head, "prototype_z_path": z_path,
                          "embedding_lr_scale": lr_scale})
    model = build_model(method, cfg, init)
    if method == "dt":
        trainer = BlockTrainer(model, OptimConfig(batch_size=32, lr=3e-3))
        for _ in range(epochs):
            for t in range(1, cfg.T + 1):
                trainer.train_block_epoch(t, train)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
        for _ in range(epochs):
            train_end_to_end_epoch(model, opt, train, batch_size=32)
    model.eval()
    metrics = {"epoch": epochs, "method": method, "test_acc_deterministic": evaluate_accuracy(model, test),
               "block_l2": {"1": 0.5}}
    ckpt = Checkpoint(method=method, config=cfg, state_dict=model.state_dict(), metrics=metrics,
                      data={"name": dataset, "classes": train.classes, "mean": train.mean, "std": train.std,
                            "input_shape": list(train.input_shape)})
    path = folder / f"{name or f'{method}-{embedding}-{head}-{z_path}'.replace(':', '')}.pt"
    save_checkpoint(path, ckpt)
    return path, ckpt


def torch_probs(ckpt: Checkpoint, raw: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
    """The reference: the checkpoint's own module on normalised inputs (what noprop-train evaluates)."""
    model = ckpt.model()
    mean = torch.tensor(ckpt.data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.data["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        x = (torch.from_numpy(raw) - mean) / std
        return model(x, None if noise is None else torch.from_numpy(noise)).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoints(folder):
    return {method: tiny_checkpoint(folder, method) for method in ("dt", "backprop")}


def run_onnx(path, raw: np.ndarray, noise: np.ndarray | None = None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": raw} if noise is None else {"image": raw, "noise": noise}
    return session.run(["probabilities", "label"], feeds)


def parity(path, ckpt: Checkpoint, mode: str, folder) -> float:
    """Max abs probability difference over batch 1 and batch 7; asserts identical labels."""
    images, _ = task_images(folder)
    rng = np.random.default_rng(5)
    worst = 0.0
    for n in (1, 7):
        raw = np.concatenate([images[:n - n // 2], rng.random((n // 2, 1, 12, 12), dtype=np.float32)])
        noise = rng.standard_normal((ckpt.config.T + 1, n, ckpt.config.embedding_dim), dtype=np.float32) \
            if mode == "stochastic" else None
        probs, labels = run_onnx(path, raw, noise)
        ref = torch_probs(ckpt, raw, noise)
        assert probs.shape == (n, 4) and labels.dtype == np.int64 and labels.shape == (n,)
        np.testing.assert_array_equal(labels, ref.argmax(1))
        worst = max(worst, float(np.abs(probs - ref).max()))
    assert worst <= 1e-4, worst
    return worst


@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_onnx_matches_pytorch(checkpoints, folder, method, mode):
    path, ckpt = checkpoints[method]
    out = export_onnx(ckpt, folder / f"{method}-{mode}.onnx", mode=mode)
    parity(out, ckpt, mode, folder)
    if mode == "stochastic":  # the noise input really is used: other noise, other probabilities (dt adds eps)
        images, _ = task_images(folder)
        a, _ = run_onnx(out, images[:4], np.zeros((4, 4, 4), np.float32))
        b, _ = run_onnx(out, images[:4], np.ones((4, 4, 4), np.float32))
        assert not np.allclose(a, b)


@pytest.mark.parametrize("method, embedding, head, mode, z_path", [
    ("dt", "learned:5", "radial", "stochastic", "conv"),
    ("dt", "prototype", "softmax", "deterministic", "conv"),
    ("dt", "prototype", "softmax", "stochastic", "linear"),
    ("backprop", "learned:5", "radial", "deterministic", "conv"),
])
def test_parity_for_other_embeddings_and_heads(folder, method, embedding, head, mode, z_path):
    _, ckpt = tiny_checkpoint(folder, method, embedding, head, epochs=1, z_path=z_path)
    out = export_onnx(ckpt, folder / f"{method}-{embedding}-{head}-{z_path}.onnx".replace(":", ""), mode=mode)
    parity(out, ckpt, mode, folder)


def test_file_is_self_contained_checked_and_described(checkpoints, folder):
    path, ckpt = checkpoints["dt"]
    out = export_onnx(ckpt, folder / "described.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)  # no external data
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("described")) == \
        ["described.manifest.json", "described.onnx"]
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 12, 12]
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    assert model.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded into the Gemms
    meta = read_metadata(out)
    assert json.loads(meta["class_names"]) == ["top", "mid", "low", "base"]
    assert json.loads(meta["input_shape"]) == [1, 12, 12] and meta["input_scale"] == "[0, 1]"
    norm = json.loads(meta["normalisation"])
    assert norm["in_graph"] and norm["mean"] == pytest.approx(ckpt.data["mean"]) and norm["std"] == \
        pytest.approx(ckpt.data["std"])
    assert meta["T"] == "3" and meta["method"] == "dt" and meta["embedding"] == "one-hot"
    assert json.loads(meta["schedule"]) == {"kind": "cosine", "T": 3, "s": 0.008, "clip": 1e-4, "max_delta_snr": None}
    assert meta["noprop_fl_version"] == noprop.__version__ and meta["precision"] == "fp32"
    assert json.loads(meta["training_metrics"]) == ckpt.metrics
    assert meta["mode"] == "deterministic" and "TorchScript" in meta["exporter"] and meta["opset"] == "17"
    assert model.opset_import[0].version == 17
    # the manifest beside it is a ModelManifest in JSON, naming this very file
    manifest = json_format.Parse(manifest_path_for(out).read_text(), inference_pb2.ModelManifest())
    assert manifest.file_sha256 == file_sha256(out) and manifest.file_bytes == out.stat().st_size
    assert list(manifest.class_names) == ["top", "mid", "low", "base"] and manifest.T == 3
    assert manifest.schedule.clip == pytest.approx(1e-4) and not manifest.schedule.HasField("max_delta_snr")
    assert manifest.training_metrics["test_acc_deterministic"] == pytest.approx(ckpt.metrics["test_acc_deterministic"])
    info = ModelInfo.from_metadata(meta)
    assert info.to_metadata() == meta  # metadata <-> ModelInfo round trip is lossless


def test_int8_runs_shrinks_and_keeps_accuracy(checkpoints, folder):
    path, _ = checkpoints["dt"]
    fp32 = export_checkpoint(path, folder / "fp32.onnx")
    result = export_checkpoint(path, folder / "int8.onnx", int8=True, calibration=128, int8_scheme="static")
    onnx.checker.check_model(str(result.path), full_check=True)
    model = onnx.load(str(result.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert result.bytes < fp32.bytes and result.fp32_bytes == fp32.bytes
    images, labels = task_images(folder)
    acc = {}
    for name, p in (("fp32", fp32.path), ("int8", result.path)):
        m = EdgeModel(p, threads=1)
        acc[name] = float((m.run_batches(images, 64)[1] == labels).mean())
    assert acc["fp32"] > 0.9, acc
    assert acc["int8"] >= acc["fp32"] - 0.02, acc
    meta = read_metadata(result.path)
    assert meta["precision"] == "int8" and json.loads(meta["quantization"])["calibration_images"] == 128
    manifest = json.loads(manifest_path_for(result.path).read_text())
    assert manifest["precision"] == "int8" and manifest["file_sha256"] == file_sha256(result.path)


def test_int8_of_a_full_size_block_is_under_30_percent(folder):
    """The size goal needs real layer sizes (the tiny test models are dominated by graph overhead): one block
    of Figure 6 on 28x28 inputs, untrained, calibrated on random images."""
    cfg = NoPropConfig(input_shape=(1, 28, 28), num_classes=10, T=1)
    model = BackpropChain(cfg).eval()
    ckpt = Checkpoint(method="backprop", config=cfg, state_dict=model.state_dict(),
                      data={"name": "none", "classes": [str(i) for i in range(10)], "mean": [0.3], "std": [0.3]})
    from noprop.deploy.quantize import quantize_model

    fp32 = export_onnx(ckpt, folder / "full.onnx", write_manifest=False)
    images = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    int8 = quantize_model(fp32, folder / "full.int8.onnx", images)
    ratio = int8.stat().st_size / fp32.stat().st_size
    assert ratio <= 0.30, ratio
    EdgeModel(int8, threads=1).run(images[:3])


def test_cli_exports_and_reports(checkpoints, folder, capsys):
    path, _ = checkpoints["backprop"]
    out = folder / "cli.onnx"
    assert export_cli.main([str(path), "-o", str(out), "--mode", "stochastic"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert EdgeModel(out).info.mode == "stochastic"


def test_manifest_beside_a_checkpoint(checkpoints, capsys):
    path, ckpt = checkpoints["dt"]
    assert export_cli.main([str(path), "--manifest-only"]) == 0
    written = path.with_name(path.stem + ".manifest.json")
    assert str(written) in capsys.readouterr().out
    manifest = json_format.Parse(written.read_text(), inference_pb2.ModelManifest())
    assert manifest.format == "noprop-fl/checkpoint" and manifest.file_sha256 == file_sha256(path)
    assert manifest.method == "dt" and manifest.T == 3 and list(manifest.class_names) == ckpt.data["classes"]


def test_cli_bad_inputs_are_one_line_errors(checkpoints, folder, capsys):
    path, _ = checkpoints["dt"]
    foreign = folder / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    (folder / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    cases = [
        ([str(foreign), "-o", str(folder / "x.onnx")], "not a noprop-fl checkpoint"),
        ([str(folder / "garbage.pt"), "-o", str(folder / "x.onnx")], "not a readable noprop-fl checkpoint"),
        ([str(folder / "missing.pt"), "-o", str(folder / "x.onnx")], "does not exist"),
        ([str(path), "-o", str(folder / "x.onnx"), "--int8", "--int8-scheme", "static", "--data",
          "npz:/nonexistent.npz"], "nonexistent.npz"),
        ([str(path), "-o", str(folder / "x.onnx"), "--int8", "--int8-scheme", "static", "--calibration", "0"],
         "--calibration"),
        ([str(checkpoints["backprop"][0]), "-o", str(folder / "x.onnx"), "--blocks"], "exports NoProp-DT chains"),
        ([str(path), "-o", str(folder / "x.onnx"), "--blocks", "--mode", "stochastic"], "deterministic chains only"),
        ([str(path), "-o", str(folder / "x.onnx"), "--blocks", "--anytime-loss", "-1"], "--anytime-loss"),
        ([str(path), "-o", str(folder / "x.onnx"), "--blocks", "--holdout", "-3"], "--holdout"),
    ]
    for argv, message in cases:
        assert export_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (folder / "x.onnx").exists()


def test_dynamo_exporter_alternative(checkpoints, folder, monkeypatch):
    """The other exporter works for the softmax head (and says what to do for the radial one). No skip: the dev
    extras install onnxscript, which torch's dynamo exporter needs."""
    _, ckpt = checkpoints["dt"]
    calls, export = [], torch.onnx.export

    def spy(*args, **kwargs):  # the metadata alone would not tell which exporter made the graph
        calls.append(kwargs.get("dynamo"))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    out = export_onnx(ckpt, folder / "dynamo.onnx", exporter="dynamo")
    assert calls == [True], calls
    assert read_metadata(out)["opset"] == "18" and "dynamo" in read_metadata(out)["exporter"]
    parity(out, ckpt, "deterministic", folder)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(ckpt, folder / "x.onnx", exporter="dynamo", opset=17)


def test_an_ensemble_checkpoint_exports_its_readout_as_one_graph(checkpoints, folder, capsys):
    """A federated checkpoint reads out the ensemble of its blocks (--readout ensemble): the one-graph export
    computes that readout, not the chain; the stochastic mode, which needs the chain, refuses."""
    path, chain_ckpt = checkpoints["dt"]
    ckpt = Checkpoint(method="dt", config=dataclasses.replace(chain_ckpt.config, readout="ensemble"),
                      state_dict=chain_ckpt.state_dict, metrics=chain_ckpt.metrics, data=chain_ckpt.data)
    ensemble_path = save_checkpoint(folder / "dt-ensemble.pt", ckpt)
    out = export_onnx(ckpt, folder / "dt-ensemble.onnx")
    parity(out, ckpt, "deterministic", folder)
    images, _ = task_images(folder)
    chain_probs, _ = run_onnx(export_onnx(chain_ckpt, folder / "dt-chain.onnx"), images[:8])
    ensemble_probs, _ = run_onnx(out, images[:8])
    assert not np.allclose(chain_probs, ensemble_probs, atol=1e-3)  # the same weights, another readout
    assert "ensemble" in onnx.load(str(out)).doc_string
    with pytest.raises(ExportError, match="draws no noise"):
        export_onnx(ckpt, folder / "x.onnx", mode="stochastic")
    assert export_cli.main([str(ensemble_path), "-o", str(folder / "x.onnx"), "--mode", "stochastic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "draws no noise" in err, err
    assert not (folder / "x.onnx").exists()
    # --readout chain exports the same weights' chain: what the checkpoint would have given before
    again = export_checkpoint(ensemble_path, folder / "dt-as-chain.onnx", readout="chain").path
    np.testing.assert_allclose(run_onnx(again, images[:8])[0], chain_probs, atol=1e-6)
