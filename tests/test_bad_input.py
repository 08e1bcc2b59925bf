"""Bad input everywhere (issue 6, item 6): one table, each row a real subprocess of a console script (or a real
gRPC call to a running `noprop-edge serve`) that must end with the right exit code (or status code), a last
stderr line that says what is wrong, and no traceback anywhere.

The table (BAD_INPUT) is the source of RELIABILITY.md's bad-input rows. A row's argv names the console script
first; its strings are formatted with the session's files ({ckpt}, {onnx}, {task}, {png}, {closed_port}) and the
row's own folder ({tmp}), which the row's setup fills with the faulty file first. Rows run on a few threads at
once: each is a subprocess that mostly waits for torch to import on a loaded machine.
"""

from __future__ import annotations

import functools
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from procs import quiet_env, script
from synthetic import synthetic_arrays
from test_export import task_images, tiny_checkpoint

from noprop.deploy.edge import EdgeModel
from noprop.deploy.export import export_onnx
from noprop.ops.network import free_port
from noprop.proto import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.e2e  # every row runs a console script, or calls a running noprop-edge serve

ROW_TIMEOUT_S = 240  # a row that hangs (a client waiting forever for a server) fails on this
CAP_BYTES = 65536  # --max-request-bytes of the served model


@dataclass
class Outcome:
    code: int | str  # exit code, or a gRPC status name
    stderr: str  # stderr, or the status details
    stdout: str = ""
    seconds: float = 0.0


@dataclass
class Session:
    values: dict[str, str]  # placeholders of the argv strings
    target: str  # HOST:PORT of the running noprop-edge serve


Setup = Callable[[Path, Session], None]


@dataclass(frozen=True)
class Row:
    id: str
    run: list[str] | Callable[[Session], Outcome]  # console script + args, or a gRPC call
    setup: Setup | None  # writes the faulty input into the row's folder
    code: int | str  # expected exit code (2: bad usage or input) or gRPC status name
    phrase: str  # the last line of stderr (or the status details) must contain this


# -- setups: each writes one faulty file into the row's folder -------------------------------------------


def truncated(source: str, name: str, keep: float = 1 / 3) -> Setup:
    def setup(folder: Path, s: Session) -> None:
        blob = Path(source.format(**s.values)).read_bytes()
        (folder / name).write_bytes(blob[: int(len(blob) * keep)])
    return setup


def random_bytes(name: str, size: int = 4096) -> Setup:
    def setup(folder: Path, s: Session) -> None:
        (folder / name).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return setup


def text(name: str, content: str) -> Setup:
    def setup(folder: Path, s: Session) -> None:
        (folder / name).write_text(content)
    return setup


def images_npz(name: str, size: int) -> Setup:
    """An .npz of size x size images (the model takes 12x12): train/test splits and the x_test/y_test pair."""
    def setup(folder: Path, s: Session) -> None:
        x, y = synthetic_arrays(64, size=size, seed=3)
        np.savez(folder / name, x_train=x, y_train=y, x_test=x, y_test=y,
                 classes=np.array(["top", "mid", "low", "base"]))
    return setup


def tampered_checkpoint(name: str) -> Setup:
    """The checkpoint with one byte of its payload changed: it still unpickles, but fails its checksum."""
    def setup(folder: Path, s: Session) -> None:
        envelope = torch.load(s.values["ckpt"], weights_only=True)
        body = bytearray(envelope["payload"])
        body[len(body) // 2] ^= 0xFF
        envelope["payload"] = bytes(body)
        torch.save(envelope, folder / name)
    return setup


def corrupt_fashion_mnist(folder: Path, s: Session) -> None:
    """A data root whose Fashion-MNIST files exist but hold garbage."""
    raw = folder / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")


def shape_mismatched_run(folder: Path, s: Session) -> None:
    """A run folder holding a checkpoint of 12x12 images, resumed on a dataset of 20x20 ones."""
    (folder / "run").mkdir()
    (folder / "run" / "checkpoint.pt").write_bytes(Path(s.values["ckpt"]).read_bytes())
    images_npz("wide.npz", 20)(folder, s)


def shape_mismatched_server_run(folder: Path, s: Session) -> None:
    """An output folder holding a checkpoint of 12x12 images, resumed on a dataset of 20x20 ones."""
    (folder / "out").mkdir()
    (folder / "out" / "checkpoint.pt").write_bytes(Path(s.values["ckpt"]).read_bytes())
    images_npz("wide.npz", 20)(folder, s)


# -- gRPC rows: a real call to the running `noprop-edge serve` ------------------------------------------


def grpc_call(make_request: Callable[[], inference_pb2.PredictRequest]) -> Callable[[Session], Outcome]:
    def call(s: Session) -> Outcome:
        with grpc.insecure_channel(s.target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            start = time.monotonic()
            try:
                stub.Predict(make_request(), timeout=30)
            except grpc.RpcError as exc:
                return Outcome(exc.code().name, exc.details() or "", seconds=time.monotonic() - start)
            return Outcome("OK", "", seconds=time.monotonic() - start)
    return call


def predict_request(shape: tuple[int, ...], noise: int = 0) -> Callable[[], inference_pb2.PredictRequest]:
    def make() -> inference_pb2.PredictRequest:
        pixels = np.random.default_rng(0).random(int(np.prod(shape)), dtype=np.float32)
        return inference_pb2.PredictRequest(shape=list(shape), pixels=pixels.tolist(), noise=[0.0] * noise)
    return make


# -- the table ----------------------------------------------------------------------------------------------

TRAIN = ["noprop-train", "--dataset", "npz:{task}", "--channels", "4,4,4", "--hidden", "8", "--out", "{tmp}/run"]
CLIENT = ["noprop-client", "--data", "npz:{task}", "--state-dir", "{tmp}/home"]
SERVER = ["noprop-server", "--dataset", "npz:{task}", "--out", "{tmp}/out", "--port", "{closed_port}",
          "--control-port", "{control_port}"]

BAD_INPUT: list[Row] = [
    # training settings: flags, the TOML file, the data
    Row("train-T-0", [*TRAIN, "--T", "0"], None, 2, "T=0: must be at least 1"),
    Row("train-negative-epochs", [*TRAIN, "--epochs", "-1"], None, 2, "epochs=-1: must be at least 1"),
    Row("train-unknown-method", [*TRAIN, "--method", "nosuchmethod"], None, 2, "use one of dt, ct, fm"),
    Row("train-toml-wrong-type", [*TRAIN, "--config", "{tmp}/run.toml"], text("run.toml", 'epochs = "five"\n'), 2,
        "key 'epochs' must be a whole number, not 'five'"),
    Row("train-missing-data-dir", ["noprop-train", "--data-root", "{tmp}/nowhere", "--out", "{tmp}/run"], None, 2,
        "Fashion-MNIST not found under"),
    Row("train-corrupt-data-dir", ["noprop-train", "--data-root", "{tmp}/data", "--out", "{tmp}/run"],
        corrupt_fashion_mnist, 2, "is corrupt or incomplete"),
    Row("train-cnn-learned-embedding", [*TRAIN, "--method", "cnn", "--embedding", "learned:8"], None, 2,
        "the cnn method has no class embedding: leave embedding at one-hot"),
    Row("train-resume-image-shape", [*TRAIN, "--dataset", "npz:{tmp}/wide.npz", "--resume"],
        shape_mismatched_run, 2, "was trained on input [1, 12, 12]"),
    # federation settings
    Row("sim-T-0", ["noprop-sim", "--clients", "2", "--T", "0", "--out", "{tmp}/out"], None, 2,
        "T=0: must be at least 1"),
    Row("sim-no-clients", ["noprop-sim", "--clients", "0"], None, 2, "--clients 0: need at least 1"),
    Row("sim-unknown-method", ["noprop-sim", "--method", "ddpm", "--out", "{tmp}/out"], None, 2,
        "method='ddpm': use one of dt, ct, fm"),
    Row("sim-fm-solver-of-adjoint", ["noprop-sim", "--method", "fm", "--solver", "rk4", "--out", "{tmp}/out"], None,
        2, "unknown solver 'rk4' for fm"),
    Row("sim-partition-classes-unused", ["noprop-sim", "--clients", "2", "--partition", "classes:1", "--dataset",
                                         "npz:{task}", "--out", "{tmp}/out"], None, 2,
        "2 partitions x 1 classes each cannot hold all 4 classes"),
    # the flag the user typed (--partition), not the run setting it fills (partition-type)
    Row("sim-partition-negative-alpha", ["noprop-sim", "--clients", "2", "--partition", "dirichlet:-1"], None, 2,
        "--partition dirichlet:-1: partitioning 'dirichlet:-1': alpha must be a positive number"),
    # the data is checked before Ray starts: the line names the flag
    Row("sim-unknown-dataset", ["noprop-sim", "--clients", "2", "--dataset", "nosuchdata", "--out", "{tmp}/out"],
        None, 2, "--dataset nosuchdata: unknown dataset 'nosuchdata'"),
    Row("sim-unknown-client-data", ["noprop-sim", "--clients", "2", "--dataset", "npz:{task}", "--client-data",
                                    "nosuchdata", "--out", "{tmp}/out"], None, 2,
        "--client-data nosuchdata: unknown dataset 'nosuchdata'"),
    Row("server-resume-image-shape", [*SERVER, "--dataset", "npz:{tmp}/wide.npz", "--resume"],
        shape_mismatched_server_run, 2, "was trained on input [1, 12, 12] with 4 classes"),
    Row("server-toml-wrong-type", [*SERVER, "--config", "{tmp}/run.toml"], text("run.toml", 'rounds = "three"\n'),
        2, "key 'rounds' must be a whole number, not 'three'"),
    Row("server-config-pyproject-without-run-config", [*SERVER, "--config", "{tmp}/pyproject.toml"],
        text("pyproject.toml", '[project]\nname = "app"\n\n[tool.flwr.app.components]\nserverapp = "a:app"\n'), 2,
        "a [tool] table without [tool.flwr.app.config]: put the run settings in that table"),
    Row("client-negative-max-blocks", [*CLIENT, "--server", "127.0.0.1:{closed_port}", "--max-blocks", "-1"], None,
        2, "--max-blocks -1: must be 0 (automatic) or more"),
    Row("client-partition-out-of-range", [*CLIENT, "--server", "127.0.0.1:{closed_port}", "--partition", "4/4"],
        None, 2, "0 <= I < N"),
    Row("client-partition-classes-beyond-the-data", [*CLIENT, "--server", "127.0.0.1:{closed_port}", "--partition",
                                                     "0/2", "--partition-type", "classes:9"], None, 2,
        "use classes:K with K <= 4"),
    Row("client-missing-data", [*CLIENT, "--server", "127.0.0.1:{closed_port}", "--data", "npz:{tmp}/none.npz"],
        None, 2, "npz file not found"),
    Row("client-server-not-answering", [*CLIENT, "--server", "127.0.0.1:{closed_port}", "--wait", "3"], None, 2,
        "no server answers at 127.0.0.1:"),
    Row("client-server-name-unknown", [*CLIENT, "--server", "nosuchhost.invalid"], None, 2,
        "the name nosuchhost.invalid does not resolve"),
    Row("client-superlink-name-unknown", [*CLIENT, "--superlink", "nosuchhost.invalid:9092"], None, 2,
        "--superlink nosuchhost.invalid:9092: the name nosuchhost.invalid does not resolve"),
    # TLS material
    Row("certs-unwritable-dir", ["noprop-certs", "/proc/noprop-certs"], None, 2,
        "give a DIR in a folder you can write to"),
    # checkpoints into noprop-export
    Row("export-truncated-checkpoint", ["noprop-export", "{tmp}/bad.pt", "-o", "{tmp}/m.onnx"],
        truncated("{ckpt}", "bad.pt"), 2, "is not a readable noprop-fl checkpoint"),
    Row("export-checksum-mismatch", ["noprop-export", "{tmp}/bad.pt", "-o", "{tmp}/m.onnx"],
        tampered_checkpoint("bad.pt"), 2, "fails its checksum"),
    Row("export-calibration-image-shape", ["noprop-export", "{ckpt}", "-o", "{tmp}/m.onnx", "--int8",
                                           "--int8-scheme", "static", "--data", "npz:{tmp}/wide.npz",
                                           "--calibration", "16"],  # static: the scheme that calibrates
        images_npz("wide.npz", 20), 2, "has examples [1, 20, 20] but the model takes [1, 12, 12]"),
    # ONNX files into noprop-edge
    *[Row(f"edge-{cmd}-{kind}-onnx", ["noprop-edge", cmd, "{tmp}/bad.onnx", *extra], setup, 2,
          "cannot be loaded as an ONNX model: corrupt or truncated")
      for kind, setup in (("truncated", truncated("{onnx}", "bad.onnx")), ("corrupt", random_bytes("bad.onnx")))
      for cmd, extra in (("info", []), ("predict", ["{png}"]), ("eval", ["--data", "{task}"]),
                         ("serve", ["--port", "0"]))],
    Row("edge-serve-no-workers", ["noprop-edge", "serve", "{onnx}", "--port", "0", "--workers", "0"], None, 2,
        "need at least 1 worker"),
    Row("edge-serve-cap-below-workers", ["noprop-edge", "serve", "{onnx}", "--port", "0", "--workers", "4",
                                         "--max-concurrent", "2"], None, 2, "--max-concurrent at least --workers"),
    Row("edge-eval-image-shape", ["noprop-edge", "eval", "{onnx}", "--data", "{tmp}/wide.npz"],
        images_npz("wide.npz", 20), 2, "has shape [64, 20, 20] but the model takes [N, ...] of [1, 12, 12]"),
    Row("edge-predict-folder", ["noprop-edge", "predict", "{onnx}", "{tmp}"], None, 2,
        "is a folder: pass image files (PNG, JPEG, ...) or .npy arrays"),
    Row("edge-query-server-not-answering", ["noprop-edge", "query", "127.0.0.1:{closed_port}", "--info",
                                            "--timeout", "3"], None, 1, "UNAVAILABLE"),
    # requests to the gRPC service (64 KiB cap)
    Row("grpc-predict-wrong-shape", grpc_call(predict_request((1, 1, 28, 28))), None, "INVALID_ARGUMENT",
        "shape [1, 1, 28, 28] does not match the model's input [N, 1, 12, 12]"),
    Row("grpc-predict-noise-for-deterministic", grpc_call(predict_request((1, 1, 12, 12), noise=16)), None,
        "INVALID_ARGUMENT", "this model is deterministic: send no noise"),
    Row("grpc-predict-over-size-cap", grpc_call(predict_request((200, 1, 12, 12))), None, "RESOURCE_EXHAUSTED",
        f"vs. {CAP_BYTES})"),
]


# -- running the table ----------------------------------------------------------------------------------------


@functools.cache
def help_text(name: str) -> str:
    return subprocess.run([script(name), "--help"], capture_output=True, text=True, env=quiet_env(),
                          timeout=ROW_TIMEOUT_S).stdout


def has_flag(name: str, flag: str) -> bool:
    return re.search(rf"(^|\s){re.escape(flag)}\b", help_text(name)) is not None


def with_insecure(argv: list[str]) -> list[str]:
    """noprop-server / noprop-client may come to require --insecure for plain-text loopback: pass it only where
    the parser knows it, so that a row tests its own fault before and after that change."""
    if argv[0] in ("noprop-server", "noprop-client") and has_flag(argv[0], "--insecure"):
        return [*argv, "--insecure"]
    return argv


def run_row(row: Row, session: Session, folder: Path) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    if row.setup is not None:
        row.setup(folder, session)
    if callable(row.run):
        return row.run(session)
    values = {**session.values, "tmp": str(folder)}
    argv = with_insecure([part.format(**values) for part in row.run])
    start = time.monotonic()
    res = subprocess.run([script(argv[0]), *argv[1:]], capture_output=True, text=True, cwd=folder,
                         env=quiet_env(folder / "flwr-home"), stdin=subprocess.DEVNULL, timeout=ROW_TIMEOUT_S)
    return Outcome(res.returncode, res.stderr, res.stdout, time.monotonic() - start)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One tiny trained checkpoint and its ONNX file, the synthetic task, a PNG, and `noprop-edge serve`."""
    folder = tmp_path_factory.mktemp("bad-input")
    ckpt, trained = tiny_checkpoint(folder, "dt", epochs=1)
    onnx_path = export_onnx(trained, folder / "model.onnx")
    images, _ = task_images(folder)
    png = folder / "img.png"
    Image.fromarray(np.round(images[0, 0] * 255).astype(np.uint8)).save(png)
    proc = subprocess.Popen([script("noprop-edge"), "serve", str(onnx_path), "--port", "0", "--threads", "1",
                             "--workers", "2", "--max-request-bytes", str(CAP_BYTES), "--grace", "1"],
                            env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", lines.get(timeout=180))  # loaded machines
    except queue.Empty:
        match = None
    if not match:
        proc.kill()
        pytest.fail(f"noprop-edge serve did not start: {proc.communicate()[1]}")
    values = {"ckpt": str(ckpt), "onnx": str(onnx_path), "task": str(folder / "task.npz"), "png": str(png),
              "closed_port": str(free_port()), "control_port": str(free_port())}
    yield Session(values, match.group(1))
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def outcomes(request, session, tmp_path_factory) -> dict[str, Future]:
    """Start every selected row at once on 4 threads; each test waits for its own."""
    this = request.module.__name__
    selected = {item.callspec.params["row"].id: item.callspec.params["row"] for item in request.session.items
                if item.module.__name__ == this and hasattr(item, "callspec") and "row" in item.callspec.params}
    root = tmp_path_factory.mktemp("rows")
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="bad-input") as pool:
        yield {row_id: pool.submit(run_row, row, session, root / row_id) for row_id, row in selected.items()}


@pytest.mark.parametrize("row", BAD_INPUT, ids=[row.id for row in BAD_INPUT])
def test_bad_input(row: Row, outcomes: dict[str, Future]):
    out = outcomes[row.id].result(timeout=ROW_TIMEOUT_S * 2)
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    shown = f"exit {out.code} after {out.seconds:.0f}s\nstderr:\n{out.stderr[-3000:]}\nstdout:\n{out.stdout[-1000:]}"
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, shown
    assert out.code == row.code, shown
    assert lines and row.phrase in lines[-1], shown


def test_service_still_answers_after_the_bad_requests(session, outcomes):
    """The bad gRPC rows leave the server up: a good request gets its prediction."""
    for row in BAD_INPUT:
        if callable(row.run) and row.id in outcomes:
            outcomes[row.id].result(timeout=ROW_TIMEOUT_S)
    request = predict_request((3, 1, 12, 12))()
    with grpc.insecure_channel(session.target) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).Predict(request, timeout=30)
    # the model's own answer for those pixels, run here: the service still serves that model, correctly
    probs, labels = EdgeModel(session.values["onnx"]).run(np.asarray(request.pixels, np.float32).reshape(3, 1, 12, 12))
    assert [p.label for p in reply.predictions] == labels.tolist()
    assert np.allclose([list(p.probabilities) for p in reply.predictions], probs, atol=1e-6)

