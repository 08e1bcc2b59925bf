"""noprop-edge: a process without torch, the CLI's inputs and errors, and the gRPC service over loopback."""

from __future__ import annotations

import json
import math
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
from procs import wait_for
from test_export import task_images, tiny_checkpoint

from noprop.deploy import edge, edge_cli, edge_data
from noprop.deploy.export import export_onnx
from noprop.proto import inference_pb2, inference_pb2_grpc

# Deadlines, not durations: each only stops a hung wait, with room for a loaded machine (no test asserts a speed).
HANG_S = 300  # a subprocess of the CLI
START_S = 120  # `serve` printing its address and answering health checks
STOP_S = 120  # `serve` exiting after SIGTERM
RPC_S = 60  # one call to the running service



def import_blocker(*packages: str) -> str:
    """A sitecustomize that makes every import of these packages (and their submodules) fail: put its folder on
    PYTHONPATH of a child process."""
    return f"""
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ImportError(f"{{name}} is blocked in this process (noprop-edge must not need it)")
        return None

sys.meta_path.insert(0, _Blocked())
"""


NO_TORCH = import_blocker("torch")


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
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.e2e
def test_predict_and_eval_in_a_process_where_torch_cannot_be_imported(models, pngs, folder, no_torch_env):
    blocked = run(["-c", "import torch"], no_torch_env)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker works
    paths, labels = pngs
    r = run(["-m", "noprop.deploy.edge_cli", "predict", str(models["deterministic"]), *map(str, paths), "--json",
             "--threads", "1"], no_torch_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [g["label"] for g in got] == labels.tolist()
    assert got[0]["class"] == ["top", "mid", "low", "base"][labels[0]]
    r = run(["-m", "noprop.deploy.edge_cli", "eval", str(models["stochastic"]), "--data", str(folder / "task.npz"),
             "--json", "--threads", "1"], no_torch_env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    # the reference: the same model in this process, on the noise of the seed the run reports (it drew its own)
    images, labels = task_images(folder)
    _, expected = edge.EdgeModel(models["stochastic"], threads=1).run_batches(images, 256, result["seed"])
    assert result["examples"] == 200 and result["correct"] == int((expected == labels).sum())
    assert result["accuracy"] == result["correct"] / 200 >= 0.97  # measured 1.0 (seeds 0-3)
    # the speed is the bench's business (bench/inference.py): here only what the number means
    assert math.isfinite(result["seconds"]) and result["seconds"] > 0
    assert result["images_per_s"] == pytest.approx(result["examples"] / result["seconds"], rel=1e-9)
    # the generated protocol modules and the edge modules import without torch too
    r = run(["-c", "import sys, noprop.deploy.edge, noprop.deploy.edge_cli, noprop.deploy.edge_data, "
                   "noprop.proto.inference_pb2, noprop.proto.inference_pb2_grpc; "
                   "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)"], no_torch_env)
    assert r.returncode == 0, r.stderr
    # the modules copied onto a device (edge.py, the runtime, with its command line) predict as well
    alone = folder / "device"
    alone.mkdir(exist_ok=True)
    script = copy_device_files(alone)
    r = run([script, "predict", str(models["deterministic"]), str(paths[0])], no_torch_env, cwd=alone)
    assert r.returncode == 0 and r.stdout.split("\t")[1] == str(labels[0]), r.stderr
    # serve run as a script or with -m uses the package's modules (noprop.deploy.edge_service raises its errors):
    # still one line, exit 2, not a traceback from an error class main does not know
    for how in ([script], ["-m", "noprop.deploy.edge_cli"]):
        r = run([*how, "serve", str(models["deterministic"]), "--host", "0.0.0.0"], no_torch_env, cwd=alone)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and "--insecure" in err, (how, err)
    # and a broken model is one line on stderr, exit 2, no traceback
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(models["deterministic"].read_bytes()[:5000])
    r = run(["-m", "noprop.deploy.edge_cli", "predict", str(truncated), str(paths[0])], no_torch_env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_predict_matches_the_model_and_info_describes_it(models, pngs, capsys):
    paths, labels = pngs
    assert edge_cli.main(["predict", str(models["deterministic"]), *map(str, paths[:2])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(line.split("\t")[1]) for line in lines] == labels[:2].tolist()
    assert edge_cli.main(["info", str(models["stochastic"])]) == 0
    out = capsys.readouterr().out
    assert "top, 1 mid, 2 low, 3 base" in out and "stochastic" in out and "matches" in out
    assert "inside the graph" in out and "[4, N, 4]" in out
    assert edge_cli.main(["info", str(models["deterministic"]), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["T"] == 3 and manifest["method"] == "dt" and manifest["input_shape"] == [1, 12, 12]


@pytest.mark.e2e
def test_stochastic_runs_are_reproducible_and_seeded(models, folder):
    model = edge.EdgeModel(models["stochastic"], threads=1)
    images, _ = task_images(folder)
    a = model.run(images[:5], rng=np.random.default_rng(1))[0]
    b = model.run(images[:5], rng=np.random.default_rng(1))[0]
    c = model.run(images[:5], rng=np.random.default_rng(2))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(model.run(images[:5])[0], model.run(images[:5])[0])  # no rng: fresh noise each call


def test_cli_seed_repeats_a_stochastic_run_and_no_seed_draws_a_reported_one(models, pngs, capsys):
    """No --seed: each run draws its own seed and reports it (JSON and stderr); that seed given back repeats it."""
    paths = [str(p) for p in pngs[0][:3]]

    def predict(*flags: str) -> tuple[list[dict], str]:
        assert edge_cli.main(["predict", str(models["stochastic"]), *paths, "--json", *flags]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    seeded = [predict("--seed", "7") for _ in range(2)]
    assert seeded[0] == seeded[1] and {r["seed"] for r in seeded[0][0]} == {7} and seeded[0][1] == ""
    assert [r["probability"] for r in predict("--seed", "8")[0]] != [r["probability"] for r in seeded[0][0]]
    drawn = [predict() for _ in range(2)]
    seeds = [rows[0]["seed"] for rows, _ in drawn]
    assert seeds[0] != seeds[1] and all(isinstance(s, int) and 0 <= s < 2**53 for s in seeds)
    assert [r["probability"] for r in drawn[0][0]] != [r["probability"] for r in drawn[1][0]]
    for (rows, err), seed in zip(drawn, seeds):
        assert f"noise seed {seed} (pass --seed {seed}" in err
        assert predict("--seed", str(seed))[0] == rows  # the reported seed reproduces the run
    assert edge_cli.main(["predict", str(models["deterministic"]), paths[0], "--json"]) == 0
    out = capsys.readouterr()
    assert "seed" not in json.loads(out.out)[0] and out.err == ""  # nothing random, nothing to report
    with pytest.raises(SystemExit) as usage:  # a usage error: argparse's one line, exit 2
        edge_cli.main(["predict", str(models["stochastic"]), paths[0], "--seed", "-1"])
    err = capsys.readouterr().err.strip()
    assert usage.value.code == 2 and len(err.splitlines()) == 1 and "outside 0 .. 2**64 - 1" in err, err


def test_images_of_other_size_or_channels_need_flags(models, folder, capsys):
    model = str(models["deterministic"])
    big, rgb, gray_rgb = folder / "big.png", folder / "rgb.png", folder / "gray_rgb.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(big)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(rgb)
    Image.fromarray(np.repeat(rng.integers(0, 255, (12, 12, 1), dtype=np.uint8), 3, axis=2)).save(gray_rgb)
    assert edge_cli.main(["predict", model, str(big), "--resize"]) == 0
    assert edge_cli.main(["predict", model, str(rgb), "--convert"]) == 0
    assert edge_cli.main(["predict", model, str(gray_rgb)]) == 0  # RGB file with equal channels is grayscale
    capsys.readouterr()
    x = edge_data.load_image(gray_rgb, (1, 12, 12))
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
        assert edge_cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


@pytest.mark.e2e
def test_eval_reads_a_folder_of_class_folders(models, folder, capsys):
    images, labels = task_images(folder)
    root = folder / "tree" / "test"
    names = ["top", "mid", "low", "base"]
    for i in range(12):
        (root / names[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(images[i, 0] * 255).astype(np.uint8)).save(root / names[labels[i]] / f"{i}.png")
    assert edge_cli.main(["eval", str(models["deterministic"]), "--data", str(folder / "tree"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, expected = edge.EdgeModel(models["deterministic"], threads=1).run(images[:12])  # uint8 / 255: PNG-exact
    assert result["examples"] == 12 and result["correct"] == int((expected == labels[:12]).sum())
    assert result["accuracy"] >= 11 / 12 and result["seed"] is None  # measured 12/12 (seeds 0-3); deterministic


def write_idx(raw: Path, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """MNIST-style test files (images gzipped, labels not) in raw/; returns the uint8 pixels [N, H, W]."""
    import gzip

    raw.mkdir(parents=True)
    pixels = np.round(images[:, 0] * 255).astype(np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in pixels.shape)
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + pixels.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big")
                                                 + labels.astype(np.uint8).tobytes())
    return pixels


@pytest.mark.e2e
def test_eval_reads_mnist_style_idx_files(models, folder, capsys):
    images, labels = task_images(folder)
    pixels = write_idx(folder / "idx" / "raw", images, labels)
    assert edge_cli.main(["eval", str(models["deterministic"]), "--data", str(folder / "idx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, expected = edge.EdgeModel(models["deterministic"], threads=1).run(pixels[:, None] / np.float32(255))
    assert result["examples"] == 200 and result["correct"] == int((expected == labels).sum())
    assert result["accuracy"] >= 0.97  # measured 1.0 (seeds 0-3)


def copy_device_files(device: Path) -> str:
    """edge.py (the runtime), edge_data.py and edge_cli.py (the command line) copied into `device`; the path of the
    copy of edge_cli.py, to run as a script."""
    for module in (edge, edge_data):
        shutil.copy(module.__file__, device / Path(module.__file__).name)
    return str(shutil.copy(edge_cli.__file__, device / "edge_cli.py"))


@pytest.fixture(scope="module")
def no_noprop_env(folder):
    blocker = folder / "no_noprop"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(import_blocker("torch", "noprop"))
    env = {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}
    blocked = run(["-c", "import noprop.deploy.edge"], env)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker works
    return env


@pytest.mark.e2e
def test_edge_py_alone_is_the_runtime_without_noprop_or_torch(models, folder, no_noprop_env):
    """The single-file runtime: edge.py alone in a folder, imported in a process where neither noprop nor torch can
    be imported, runs the model; run as a script without edge_cli.py beside it, it says so in one line."""
    alone = folder / "runtime-only"
    alone.mkdir()
    shutil.copy(edge.__file__, alone / "edge.py")
    images, _ = task_images(folder)
    np.save(alone / "x.npy", images[:20])
    code = ("import sys, numpy as np, edge; m = edge.EdgeModel(sys.argv[1], threads=1); "
            "print(m.predict(np.load('x.npy')).tolist()); "
            "assert not any(n.split('.')[0] in ('noprop', 'torch') for n in sys.modules), sorted(sys.modules)")
    r = run(["-c", code, str(models["deterministic"])], no_noprop_env, cwd=alone)
    assert r.returncode == 0, r.stderr
    expected = edge.EdgeModel(models["deterministic"], threads=1).run(images[:20])[1]
    assert json.loads(r.stdout) == expected.tolist()
    r = run([str(alone / "edge.py"), "info", str(models["deterministic"])], no_noprop_env, cwd=alone)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "edge_cli.py" in err and "Traceback" not in err, err


@pytest.mark.e2e
def test_edge_cli_copied_alone_runs_info_predict_and_eval_without_noprop_or_torch(models, pngs, folder,
                                                                                  no_noprop_env):
    """The loose-file deployment: edge.py, edge_data.py and edge_cli.py alone in a folder, in a process where
    neither noprop nor torch can be imported. info, predict and eval (.npz and raw IDX files) work; serve and query
    say in one line that they need the package."""
    env = no_noprop_env
    alone = folder / "lone"
    alone.mkdir()
    script = copy_device_files(alone)
    model = str(models["deterministic"])
    r = run([script, "info", str(models["stochastic"])], env, cwd=alone)
    assert r.returncode == 0 and "inside the graph" in r.stdout and "[4, N, 4]" in r.stdout, r.stderr
    paths, labels = pngs
    r = run([script, "predict", model, *map(str, paths), "--json", "--threads", "1"], env, cwd=alone)
    assert r.returncode == 0, r.stderr
    assert [g["label"] for g in json.loads(r.stdout)] == labels.tolist()
    images, labels = task_images(folder)
    pixels = write_idx(folder / "lone-idx" / "raw", images, labels)
    local = edge.EdgeModel(model, threads=1)
    for data, x in ((folder / "task.npz", images), (folder / "lone-idx", pixels[:, None] / np.float32(255))):
        r = run([script, "eval", model, "--data", str(data), "--json", "--threads", "1"], env, cwd=alone)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        expected = local.run(x)[1]
        assert result["examples"] == 200 and result["correct"] == int((expected == labels).sum()), (data, result)
    for argv in (["serve", model, "--port", "0"], ["query", "127.0.0.1:1", "--health"]):
        r = run([script, *argv], env, cwd=alone)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1, (argv, err)
        assert f"noprop-edge: error: {argv[0]} needs the noprop-fl package" in err and "Traceback" not in err, err


# -- the gRPC service ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(models, no_torch_env):
    """`noprop-edge serve` as a real process (without torch) on 127.0.0.1, an ephemeral port, a 64 KiB cap."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "noprop.deploy.edge_cli", "serve", str(models["stochastic"]), "--port", "0",
         "--max-request-bytes", "65536", "--threads", "1", "--workers", "2", "--grace", "2"],
        env=no_torch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def first_line() -> str | None:
        if proc.poll() is not None and lines.empty():
            raise AssertionError(f"noprop-edge serve exited {proc.returncode}: {proc.stderr.read()}")
        return None if lines.empty() else lines.get()

    def serving() -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    try:
        line = wait_for(first_line, START_S, 0.1, "noprop-edge serve printing its address")
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        target = f"127.0.0.1:{match.group(1)}"
        channel = grpc.insecure_channel(target)
        wait_for(serving, START_S, 0.2, f"noprop-edge serve at {target} answering SERVING")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    yield proc, target, channel
    channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def predict_request(images: np.ndarray, noise: np.ndarray | None = None, seed: int | None = None):
    """seed None leaves the field unset: a stochastic server draws a seed and reports it in the reply."""
    return inference_pb2.PredictRequest(shape=list(images.shape), pixels=images.ravel().tolist(),
                                        noise=[] if noise is None else noise.ravel().tolist(), seed=seed)


@pytest.mark.e2e
def test_grpc_service_predicts_informs_checks_health_and_survives_bad_requests(server, models, folder, pngs,
                                                                               capsys):
    proc, target, channel = server
    stub = inference_pb2_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "noprop.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    manifest = stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=RPC_S)
    local = edge.EdgeModel(models["stochastic"], threads=1)
    assert manifest.mode == "stochastic" and list(manifest.input_shape) == [1, 12, 12]
    assert list(manifest.class_names) == ["top", "mid", "low", "base"] and manifest.file_sha256 == local.sha256

    images, labels = task_images(folder)
    noise = np.random.default_rng(3).standard_normal((4, 7, 4), dtype=np.float32)
    reply = stub.Predict(predict_request(images[:7], noise), timeout=RPC_S)
    probs, expected = local.run(images[:7], noise)
    assert [p.label for p in reply.predictions] == expected.tolist()
    assert np.abs(np.array([p.probabilities for p in reply.predictions]) - probs).max() < 1e-6
    assert reply.predictions[0].class_name == manifest.class_names[expected[0]] and reply.model_sha256 == local.sha256
    assert not reply.HasField("seed")  # the caller's noise: no seed to report

    def predict(seed: int | None) -> tuple[np.ndarray, int]:
        """Probabilities of images[:3] with server-drawn noise, and the seed the reply reports."""
        reply = stub.Predict(predict_request(images[:3], seed=seed), timeout=RPC_S)
        assert reply.HasField("seed"), reply
        return np.array([p.probabilities for p in reply.predictions]), reply.seed

    (a, seed_a), (b, seed_b), (c, seed_c), (z, seed_z) = predict(11), predict(11), predict(12), predict(0)
    assert np.array_equal(a, b) and seed_a == seed_b == 11  # an explicit seed is reproducible
    assert not np.array_equal(a, c) and seed_c == 12
    assert seed_z == 0 and np.array_equal(predict(0)[0], z)  # 0 is a seed like any other
    np.testing.assert_allclose(a, local.run(images[:3], rng=np.random.default_rng(11))[0], atol=1e-6)
    (u, seed_u), (v, seed_v) = predict(None), predict(None)  # no seed: each request draws its own
    assert seed_u != seed_v and not np.array_equal(u, v)
    for probs_drawn, seed in ((u, seed_u), (v, seed_v)):  # and the reported seed gives its output again
        assert np.array_equal(predict(seed)[0], probs_drawn)

    def status_of(call, request) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=RPC_S)
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
    again = stub.Predict(predict_request(images[:7], noise), timeout=RPC_S)
    assert [p.label for p in again.predictions] == expected.tolist()
    assert edge_cli.main(["query", target, *map(str, pngs[0][:2]), "--health", "--timeout", str(RPC_S)]) == 0
    out = capsys.readouterr()
    assert "SERVING" in out.out and len(out.out.strip().splitlines()) == 3
    seed = int(re.search(r"noise seed (\d+) \(pass --seed", out.err).group(1))  # the server drew it: reported
    assert edge_cli.main(["query", target, *map(str, pngs[0][:2]), "--json", "--seed", str(seed),
                      "--timeout", str(RPC_S)]) == 0
    repeated = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in repeated] == [seed] * 2
    again_local = local.run(edge_data.load_images(pngs[0][:2], (1, 12, 12)), rng=np.random.default_rng(seed))[0]
    assert [r["probability"] for r in repeated] == pytest.approx(again_local.max(1).tolist(), abs=1e-6)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "small.png")
    small = str(folder / "small.png")
    assert edge_cli.main(["query", target, small, "--timeout", str(RPC_S)]) == 2  # wrong size: refused before sending
    assert "12x12" in capsys.readouterr().err

    # graceful shutdown on SIGTERM: exit 0, and it says so
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, STOP_S, 0.2, "noprop-edge serve exiting after SIGTERM")
    assert proc.returncode == 0
    assert "stopped" in proc.stderr.read()
    assert edge_cli.main(["query", target, "--health", "--timeout", str(RPC_S)]) == 1  # refused at once, not timed out
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_serve_beyond_loopback_without_tls_is_refused_whatever_the_name_looks_like(models, capsys):
    """A host is loopback by its address (ipaddress, shared with the launchers), not by its spelling: a name that
    starts with "127." may resolve anywhere."""
    from noprop.ops.network import is_loopback

    assert [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("127.example.com", "10.0.0.1", "0.0.0.0", "example.org")] == [False] * 4
    for host in ("127.example.com", "0.0.0.0"):
        assert edge_cli.main(["serve", str(models["deterministic"]), "--host", host, "--port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--host {host} opens the service to the network" in err, err
