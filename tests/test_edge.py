"""noprop-edge: a process without torch, the CLI's inputs and errors, and the gRPC service over loopback."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from test_export import task_images, tiny_checkpoint

from noprop.deploy import edge
from noprop.deploy.export import export_onnx
from noprop.proto import inference_pb2, inference_pb2_grpc

# A sitecustomize that makes every import of torch fail: put its folder on PYTHONPATH of a child process.
NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this process (noprop-edge must not need it)")
        return None

sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="module")
def models(folder):
    """A tiny trained NoProp-DT exported twice: deterministic and stochastic."""
    _, ckpt = tiny_checkpoint(folder, "dt")
    return {mode: export_onnx(ckpt, folder / f"{mode}.onnx", mode=mode) for mode in ("deterministic", "stochastic")}


@pytest.fixture(scope="module")
def pngs(folder):
    images, labels = task_images(folder)
    paths = []
    for i in range(6):
        path = folder / f"img{i}.png"
        Image.fromarray(np.round(images[i, 0] * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths, labels[:6]


@pytest.fixture(scope="module")
def no_torch_env(folder):
    blocker = folder / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    return {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}


def run(args: list[str], env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_predict_and_eval_in_a_process_where_torch_cannot_be_imported(models, pngs, folder, no_torch_env):
    blocked = run(["-c", "import torch"], no_torch_env)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker works
    paths, labels = pngs
    r = run(["-m", "noprop.deploy.edge", "predict", str(models["deterministic"]), *map(str, paths), "--json",
             "--threads", "1"], no_torch_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [g["label"] for g in got] == labels.tolist()
    assert got[0]["class"] == ["top", "mid", "low", "base"][labels[0]]
    r = run(["-m", "noprop.deploy.edge", "eval", str(models["stochastic"]), "--data", str(folder / "task.npz"),
             "--json", "--threads", "1"], no_torch_env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["examples"] == 200 and result["accuracy"] > 0.9 and result["images_per_s"] > 0
    # the generated protocol modules and the edge module import without torch too
    r = run(["-c", "import sys, noprop.deploy.edge, noprop.proto.inference_pb2, noprop.proto.inference_pb2_grpc; "
                   "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)"], no_torch_env)
    assert r.returncode == 0, r.stderr
    # the module copied alone (the "single file" deployment) predicts as well
    alone = folder / "device"
    alone.mkdir(exist_ok=True)
    shutil.copy(edge.__file__, alone / "edge.py")
    r = run([str(alone / "edge.py"), "predict", str(models["deterministic"]), str(paths[0])], no_torch_env, cwd=alone)
    assert r.returncode == 0 and r.stdout.split("\t")[1] == str(labels[0]), r.stderr
    # and a broken model is one line on stderr, exit 2, no traceback
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(models["deterministic"].read_bytes()[:5000])
    r = run(["-m", "noprop.deploy.edge", "predict", str(truncated), str(paths[0])], no_torch_env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_predict_matches_the_model_and_info_describes_it(models, pngs, capsys):
    paths, labels = pngs
    assert edge.main(["predict", str(models["deterministic"]), *map(str, paths[:2])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split("\t")[1]) for line in lines] == labels[:2].tolist()
    assert edge.main(["info", str(models["stochastic"])]) == 0
    out = capsys.readouterr().out
    assert "top, 1 mid, 2 low, 3 base" in out and "stochastic" in out and "matches" in out
    assert "inside the graph" in out and "[4, N, 4]" in out
    assert edge.main(["info", str(models["deterministic"]), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["T"] == 3 and manifest["method"] == "dt" and manifest["input_shape"] == [1, 12, 12]


def test_stochastic_runs_are_reproducible_and_seeded(models, folder):
    model = edge.EdgeModel(models["stochastic"], threads=1)
    images, _ = task_images(folder)
    a = model.run(images[:5], rng=np.random.default_rng(1))[0]
    b = model.run(images[:5], rng=np.random.default_rng(1))[0]
    c = model.run(images[:5], rng=np.random.default_rng(2))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_images_of_other_size_or_channels_need_flags(models, folder, capsys):
    model = str(models["deterministic"])
    big, rgb, gray_rgb = folder / "big.png", folder / "rgb.png", folder / "gray_rgb.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(big)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(rgb)
    Image.fromarray(np.repeat(rng.integers(0, 255, (12, 12, 1), dtype=np.uint8), 3, axis=2)).save(gray_rgb)
    assert edge.main(["predict", model, str(big), "--resize"]) == 0
    assert edge.main(["predict", model, str(rgb), "--convert"]) == 0
    assert edge.main(["predict", model, str(gray_rgb)]) == 0  # RGB file with equal channels is grayscale
    capsys.readouterr()
    x = edge.load_image(gray_rgb, (1, 12, 12))
    assert x.shape == (1, 12, 12) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1


def bad_cases(folder: Path, models: dict, pngs) -> list[tuple[list[str], str]]:
    good = str(models["deterministic"])
    blob = models["deterministic"].read_bytes()
    (folder / "truncated.onnx").write_bytes(blob[: len(blob) // 3])
    (folder / "corrupt.onnx").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["probabilities"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1])])
    foreign = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(foreign, folder / "foreign.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / "big.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / "rgb.png")
    (folder / "notimage.png").write_bytes(b"this is not a PNG")
    np.save(folder / "wrong.npy", np.zeros((3, 5, 5), np.float32))
    x, y = np.zeros((4, 10, 10), np.uint8), np.zeros(4, np.int64)
    np.savez(folder / "wrongshape.npz", x_test=x, y_test=y)
    np.savez(folder / "normalised.npz", x_test=np.full((4, 12, 12), -1.5, np.float32), y_test=y)
    img = str(pngs[0][0])
    return [
        (["predict", str(folder / "truncated.onnx"), img], "corrupt or truncated"),
        (["predict", str(folder / "corrupt.onnx"), img], "corrupt or truncated"),
        (["info", str(folder / "missing.onnx")], "does not exist"),
        (["info", str(folder / "foreign.onnx")], "not one exported by noprop-export"),
        (["predict", good, str(folder / "big.png")], "is 24x20 but the model takes 12x12 images"),
        (["predict", good, str(folder / "rgb.png")], "RGB (3 channels) but the model takes grayscale (1 channel)"),
        (["predict", good, str(folder / "notimage.png")], "cannot read image"),
        (["predict", good, str(folder / "missing.png")], "does not exist"),
        (["predict", good, str(folder / "wrong.npy")], "has shape [3, 5, 5]"),
        (["eval", good, "--data", str(folder / "wrongshape.npz")], "has shape [4, 10, 10]"),
        (["eval", good, "--data", str(folder / "normalised.npz")], "not normalised ones"),
        (["eval", good, "--data", str(folder / "nothing.npz")], "does not exist"),
        (["serve", good, "--host", "0.0.0.0"], "--insecure"),
    ]


def test_bad_inputs_are_one_line_errors_with_exit_2(models, pngs, folder, capsys):
    for argv, message in bad_cases(folder, models, pngs):
        assert edge.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_eval_reads_a_folder_of_class_folders(models, folder, capsys):
    images, labels = task_images(folder)
    root = folder / "tree" / "test"
    names = ["top", "mid", "low", "base"]
    for i in range(12):
        (root / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(images[i, 0] * 255).astype(np.uint8)).save(root / names[labels[i]] / f"{i}.png")
    assert edge.main(["eval", str(models["deterministic"]), "--data", str(folder / "tree"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 12 and result["accuracy"] > 0.8


def test_eval_reads_mnist_style_idx_files(models, folder, capsys):
    import gzip

    images, labels = task_images(folder)
    raw = folder / "idx" / "raw"
    raw.mkdir(parents=True)
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in pixels.shape)
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + pixels.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big")
                                                 + labels.astype(np.uint8).tobytes())
    assert edge.main(["eval", str(models["deterministic"]), "--data", str(folder / "idx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 200 and result["accuracy"] > 0.9


# -- the gRPC service ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(models, no_torch_env):
    """`noprop-edge serve` as a real process (without torch) on 127.0.0.1, an ephemeral port, a 64 KiB cap."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "noprop.deploy.edge", "serve", str(models["stochastic"]), "--port", "0",
         "--max-request-bytes", "65536", "--threads", "1", "--workers", "2", "--grace", "2"],
        env=no_torch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=30)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"noprop-edge serve did not start: {proc.stderr.read()}")
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    target = f"127.0.0.1:{match.group(1)}"
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield proc, target, channel
    channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def predict_request(images: np.ndarray, noise: np.ndarray | None = None, seed: int = 0):
    return inference_pb2.PredictRequest(shape=list(images.shape), pixels=images.ravel().tolist(),
                                        noise=[] if noise is None else noise.ravel().tolist(), seed=seed)


def test_grpc_service_predicts_informs_checks_health_and_survives_bad_requests(server, models, folder, pngs,
                                                                               capsys):
    proc, target, channel = server
    stub = inference_pb2_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "noprop.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    manifest = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)
    local = edge.EdgeModel(models["stochastic"], threads=1)
    assert manifest.mode == "stochastic" and list(manifest.input_shape) == [1, 12, 12]
    assert list(manifest.class_names) == ["top", "mid", "low", "base"] and manifest.file_sha256 == local.sha256

    images, labels = task_images(folder)
    noise = np.random.default_rng(3).standard_normal((4, 7, 4), dtype=np.float32)
    reply = stub.Predict(predict_request(images[:7], noise), timeout=10)
    probs, expected = local.run(images[:7], noise)
    assert [p.label for p in reply.predictions] == expected.tolist()
    assert np.abs(np.array([p.probabilities for p in reply.predictions]) - probs).max() < 1e-6
    assert reply.predictions[0].class_name == manifest.class_names[expected[0]] and reply.model_sha256 == local.sha256
    seeded = [stub.Predict(predict_request(images[:3], seed=11), timeout=10) for _ in range(2)]
    assert seeded[0] == seeded[1]  # server-drawn noise is reproducible from the seed

    def status_of(call, request) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        return info.value.code()

    bad = [
        predict_request(images[:2, :, :10, :]),  # wrong image size
        inference_pb2.PredictRequest(shape=[2, 1, 12, 12], pixels=[0.5] * 100),  # pixel count does not match shape
        inference_pb2.PredictRequest(shape=[0, 1, 12, 12]),  # empty batch
        predict_request(images[:2], noise[:, :3]),  # noise for 3 images, 2 sent
        predict_request(np.full((1, 1, 12, 12), np.nan, np.float32)),  # not finite
    ]
    for request in bad:
        assert status_of(stub.Predict, request) == grpc.StatusCode.INVALID_ARGUMENT
    raw = channel.unary_unary("/noprop.v1.Inference/Predict", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    assert status_of(raw, b"\x0a\xff\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT  # does not parse
    oversized = np.random.default_rng(0).random((200, 1, 12, 12), dtype=np.float32)  # 115 KiB > 64 KiB
    assert status_of(stub.Predict, predict_request(oversized)) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # still serving, and the CLI client agrees
    again = stub.Predict(predict_request(images[:7], noise), timeout=10)
    assert [p.label for p in again.predictions] == expected.tolist()
    assert edge.main(["query", target, *map(str, pngs[0][:2]), "--health"]) == 0
    out = capsys.readouterr().out
    assert "SERVING" in out and len(out.strip().splitlines()) == 3
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "small.png")
    assert edge.main(["query", target, str(folder / "small.png")]) == 2  # wrong size: refused before sending
    assert "12x12" in capsys.readouterr().err

    # graceful shutdown on SIGTERM: exit 0, and it says so
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in proc.stderr.read()
    assert edge.main(["query", target, "--health", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
