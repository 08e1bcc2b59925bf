"""Issue 26: the block bundle (noprop-export --blocks), anytime and streamed inference in noprop-edge, dynamic int8.

No timing asserts: bench/inference.py measures speed and memory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch
from test_edge import import_blocker
from test_export import TINY, task_images, write_task

from noprop.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from noprop.data import load_train_test
from noprop.deploy import edge, edge_cli, edge_data
from noprop.deploy.calibration import calibrate_exit, exit_simulation
from noprop.deploy.edge import BlockBundle, EdgeModel, ExitRule
from noprop.deploy.export import read_metadata
from noprop.deploy.export_cli import export_checkpoint
from noprop.methods import build_model
from noprop.model_configs import NoPropConfig
from noprop.trainer import BlockTrainer, OptimConfig, evaluate_accuracy

T = 4
HANG_S = 300


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("anytime")


@pytest.fixture(scope="module")
def ckpt_path(folder):
    """A tiny NoProp-DT with z-skip (the federation's default), T=4, trained two epochs on the synthetic task."""
    torch.manual_seed(0)
    dataset = write_task(folder)
    train, test = load_train_test(dataset)
    cfg = NoPropConfig(**{**TINY, "T": T, "z_skip": True})
    model = build_model("dt", cfg)
    trainer = BlockTrainer(model, OptimConfig(batch_size=32, lr=3e-3))
    for _ in range(2):
        for t in range(1, T + 1):
            trainer.train_block_epoch(t, train)
    model.eval()
    ckpt = Checkpoint(method="dt", config=cfg, state_dict=model.state_dict(),
                      metrics={"test_acc_deterministic": evaluate_accuracy(model, test)},
                      data={"name": dataset, "classes": train.classes, "mean": train.mean, "std": train.std,
                            "input_shape": list(train.input_shape)})
    path = folder / "dt-zskip.pt"
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def exported(folder, ckpt_path):
    """fp32 with a calibrated bundle, fp32 with an uncalibrated one, and int8 (dynamic) with a calibrated one."""
    out = {}
    for name, kwargs in (("fp32", {}), ("plain", {"holdout": 0}), ("int8", {"int8": True})):
        r = export_checkpoint(ckpt_path, folder / name / "model.onnx", blocks=True, **kwargs)
        out[name] = r
    return out


def holdout(folder) -> tuple[np.ndarray, np.ndarray]:
    images, labels = task_images(folder)  # 200 test images: the calibration took the last 100
    return images[100:], labels[100:]


def test_streamed_predictions_equal_the_one_graph_chain(exported, folder):
    images, _ = task_images(folder)
    full_probs, full_labels = EdgeModel(exported["fp32"].path, threads=1).run(images)
    streamed = BlockBundle(exported["fp32"].bundle, threads=1, preload=False)
    assert streamed._sessions is None  # nothing is held between blocks
    for batch in (len(images), 7):  # the bundle's own batching must not change anything
        probs, labels, used = streamed.run(images, batch_size=batch)
        np.testing.assert_array_equal(labels, full_labels)
        assert float(np.abs(probs - full_probs).max()) <= 1e-5
        assert (used == T).all()


def test_calibrated_threshold_meets_its_loss_and_anytime_equals_full_where_it_runs_on(exported, folder):
    result = exported["fp32"]
    a = result.anytime
    assert a["max_loss_points"] == 0.5 and a["examples"] == 100 and a["calibration"]["range"] == [100, 200]
    x, y = holdout(folder)
    full_probs, full_labels = EdgeModel(result.path, threads=1).run(x)
    bundle = BlockBundle(result.bundle, threads=1)
    rule = bundle.default_rule()
    assert rule is not None and rule.rule == a["rule"] and rule.threshold == a["threshold"]
    probs, labels, used = bundle.run(x, rule)
    # the stated loss, on the calibration data, by the device's own runtime
    assert 100 * ((full_labels == y).sum() - (labels == y).sum()) / len(y) <= 0.5 + 1e-9
    assert float((labels == y).mean()) == pytest.approx(a["accuracy"])
    assert float(used.mean()) == pytest.approx(a["mean_blocks"])
    stayed = used == T
    np.testing.assert_array_equal(labels[stayed], full_labels[stayed])
    assert float(np.abs(probs[stayed] - full_probs[stayed]).max(initial=0)) <= 1e-5
    left = ~stayed
    scores = edge.exit_scores(probs[left], rule.rule)
    assert (scores >= np.float32(rule.threshold)).all()  # an early answer is the confident block's own
    # the runtime's exits are the ones the calibration simulated from all blocks' outputs
    per_block, final = bundle.all_block_probabilities(x)
    sim_labels, sim_used = exit_simulation(per_block, final, rule)
    np.testing.assert_array_equal(sim_labels, labels)
    np.testing.assert_array_equal(sim_used, used)
    # in batches (rows leave a batch at different blocks) the answers do not change
    b_probs, b_labels, b_used = bundle.run_batches(x, 9, rule)
    np.testing.assert_array_equal(b_labels, labels)
    np.testing.assert_array_equal(b_used, used)


def test_a_fixed_block_count_answers_with_that_block(exported, folder):
    x, _ = holdout(folder)
    bundle = BlockBundle(exported["fp32"].bundle, threads=1)
    per_block, _ = bundle.all_block_probabilities(x)
    for k in range(1, T):
        probs, labels, used = bundle.run(x, ExitRule("blocks", blocks=k))
        assert (used == k).all()
        np.testing.assert_array_equal(labels, per_block[k - 1].argmax(1))
        assert float(np.abs(probs - per_block[k - 1]).max()) <= 1e-6


def test_calibration_is_recorded_in_the_model_and_the_bundle(exported):
    result = exported["fp32"]
    meta = read_metadata(result.path)
    recorded = json.loads(meta["anytime"])
    assert recorded["threshold"] == result.anytime["threshold"] and recorded["bundle"] == "model.blocks.zip"
    assert EdgeModel(result.path).info.anytime["rule"] == result.anytime["rule"]
    with zipfile.ZipFile(result.bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["anytime"]["threshold"] == result.anytime["threshold"]
        assert [b["file"] for b in manifest["blocks"]] == [f"block-0{t}.onnx" for t in range(1, T + 1)]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert "anytime" not in read_metadata(exported["plain"].path)
    assert BlockBundle(exported["plain"].bundle).default_rule() is None


def test_calibrate_exit_takes_the_cheapest_rule_within_the_loss():
    """Block 1 is right on the confident half, block 2 (the last) on all: the exit must take exactly the
    confident rows at block 1, and a zero-loss budget must never let a wrong early answer through."""
    n = 200
    y = np.arange(n) % 4
    eye = np.eye(4, dtype=np.float32)
    b1 = np.full((n, 4), 0.25, dtype=np.float32)
    sure = np.arange(n) < n // 2
    b1[sure] = 0.97 * eye[y[sure]] + 0.01
    b1[~sure] = 0.6 * eye[(y[~sure] + 1) % 4] + 0.1  # wrong and less sure
    final = eye[y]
    per_block = np.stack([b1, final])
    c = calibrate_exit(per_block, final, y, 0.0)
    assert c["accuracy"] == 1.0 and c["mean_blocks"] == pytest.approx(1.5)
    used = exit_simulation(per_block, final, ExitRule(c["rule"], c["threshold"]))[1]
    np.testing.assert_array_equal(used == 1, sure)
    loose = calibrate_exit(per_block, final, y, 100.0)
    assert loose["mean_blocks"] == 1.0  # anything goes: every row leaves at block 1


def test_a_calibrated_exit_keeps_its_rows_when_the_scores_wobble_by_an_ulp():
    """The device's runtime computes a block's posterior in other batch sizes than the calibration did, and another
    CPU's kernels round differently: a threshold placed on a row's own score would drop that row at one ulp less.
    Thresholds sit in the gaps between scores, so the same rows exit from scores an ulp lower or higher."""
    rng = np.random.default_rng(0)
    n, k, T = 400, 5, 3
    logits = rng.normal(size=(T, n, k)).astype(np.float32) * np.float32(3)
    per_block = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    y = per_block[-1].argmax(axis=1)
    y[:40] = (y[:40] + 1) % k  # some rows the last block gets wrong too
    for budget in (0.0, 2.0, 100.0):
        c = calibrate_exit(per_block, per_block[-1], y, budget)
        rule = ExitRule(c["rule"], c["threshold"])
        used = exit_simulation(per_block, per_block[-1], rule)[1]
        assert float(used.mean()) == pytest.approx(c["mean_blocks"])
        for direction in (-np.inf, np.inf):
            wobbled = np.nextafter(per_block, np.float32(direction)).astype(np.float32)
            np.testing.assert_array_equal(exit_simulation(wobbled, wobbled[-1], rule)[1], used)


def test_int8_bundle_is_dynamic_and_keeps_accuracy(exported, folder):
    result = exported["int8"]
    with zipfile.ZipFile(result.bundle) as zf:
        block = onnx.load_from_string(zf.read("block-01.onnx"))
    ops = {n.op_type for n in block.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops
    model = onnx.load(str(result.path))
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    assert json.loads(read_metadata(result.path)["quantization"])["tool"].endswith("quantize_dynamic")
    images, labels = task_images(folder)
    fp32 = float((EdgeModel(exported["fp32"].path).run(images)[1] == labels).mean())
    int8 = EdgeModel(result.path).run(images)[1]
    streamed = BlockBundle(result.bundle, preload=False).run(images)[1]
    assert float((int8 == labels).mean()) >= fp32 - 0.02
    assert float((streamed == labels).mean()) >= fp32 - 0.02


def cli(argv, capsys) -> tuple[int, str, str]:
    """noprop-edge's exit code (argparse's usage errors included), stdout and stderr."""
    try:
        code = edge_cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def write_npz(folder, images, labels):
    path = folder / "eval.npz"
    np.savez(path, x=np.round(images * 255).astype(np.uint8), y=labels)
    return path


def test_cli_modes_report_accuracy_seconds_and_peak_rss(exported, folder, capsys):
    images, labels = task_images(folder)
    data = write_npz(folder, images, labels)
    results = {}
    for mode in ("full", "anytime", "streamed"):
        code, out, err = cli(["eval", exported["fp32"].path, "--data", data, "--mode", mode, "--json"], capsys)
        assert code == 0, err
        results[mode] = json.loads(out)
        assert {"accuracy", "seconds", "peak_rss_mb"} <= set(results[mode]) and results[mode]["peak_rss_mb"] > 0
    assert results["streamed"]["correct"] == results["full"]["correct"]
    assert results["anytime"]["mean_blocks"] <= T and results["streamed"]["mean_blocks"] == T
    np.save(folder / "img.npy", images[0])
    code, out, _ = cli(["predict", exported["fp32"].bundle, folder / "img.npy", "--mode", "streamed", "--json"],
                       capsys)
    assert code == 0 and json.loads(out)[0]["blocks"] == T
    code, out, _ = cli(["eval", exported["fp32"].path, "--data", data, "--mode", "anytime", "--exit-after", "1",
                        "--json"], capsys)
    assert code == 0 and json.loads(out)["mean_blocks"] == 1.0
    code, out, _ = cli(["info", exported["fp32"].bundle], capsys)
    assert code == 0 and "anytime" in out and "threshold" in out


def test_bad_exit_inputs_are_one_line_errors(exported, folder, capsys):
    images, labels = task_images(folder)
    data = write_npz(folder, images, labels)
    fp32, plain = exported["fp32"].path, exported["plain"].path
    lone = folder / "lone"
    lone.mkdir(exist_ok=True)
    shutil.copy(fp32, lone / "model.onnx")  # no bundle beside it
    cases = [
        (["eval", fp32, "--data", data, "--mode", "anytime", "--threshold", "1.5"], "outside (0, 1]"),
        (["eval", fp32, "--data", data, "--mode", "anytime", "--threshold", "0"], "outside (0, 1]"),
        (["eval", fp32, "--data", data, "--mode", "anytime", "--threshold", "abc"], "not a number"),
        (["eval", plain, "--data", data, "--mode", "anytime"], "records no exit calibration"),
        (["eval", lone / "model.onnx", "--data", data, "--mode", "streamed"], "needs the block bundle"),
        (["eval", fp32, "--data", data, "--mode", "anytime", "--exit-after", "9"], "--exit-after must be in 1 .. 4"),
        (["eval", fp32, "--data", data, "--threshold", "0.9"], "need --mode anytime or streamed"),
        (["eval", fp32, "--data", data, "--mode", "anytime", "--rule", "margin"], "--rule needs --threshold"),
        (["eval", data, "--data", data, "--mode", "full", "--bundle", data], "not a readable block bundle"),
    ]
    for argv, message in cases:
        code, _, err = cli(argv, capsys)
        assert code == 2, (argv, code, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_lone_edge_cli_runs_anytime_and_streamed_without_torch_or_noprop(exported, folder):
    images, labels = task_images(folder)
    data = write_npz(folder, images, labels)
    lone = folder / "device"
    lone.mkdir(exist_ok=True)
    for module in (edge, edge_data, edge_cli):  # the runtime and its command line, copied onto a device
        shutil.copy(module.__file__, lone / f"{module.__name__.rsplit('.', 1)[-1]}.py")
    (lone / "sitecustomize.py").write_text(import_blocker("torch", "noprop"))
    env = {"PYTHONPATH": str(lone), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    accuracy = {}
    for mode in ("full", "anytime", "streamed"):
        r = subprocess.run([sys.executable, "edge_cli.py", "eval", str(exported["fp32"].path), "--data", str(data),
                            "--mode", mode, "--json"], cwd=lone, env=env, capture_output=True, text=True,
                           timeout=HANG_S)
        assert r.returncode == 0, r.stderr
        accuracy[mode] = json.loads(r.stdout)["correct"]
    assert accuracy["streamed"] == accuracy["full"]
    blocked = subprocess.run([sys.executable, "-c", "import torch"], cwd=lone, env=env, capture_output=True,
                             text=True, timeout=HANG_S)
    assert blocked.returncode != 0  # the blocker works


@pytest.fixture(scope="module")
def ensemble_exported(folder, ckpt_path):
    """The same weights read out as the ensemble of their blocks (a federated checkpoint's readout), exported
    with a calibrated bundle."""
    ckpt = load_checkpoint(ckpt_path)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, readout="ensemble"))
    path = save_checkpoint(folder / "dt-ensemble.pt", ckpt)
    return export_checkpoint(path, folder / "ensemble" / "model.onnx", blocks=True), ckpt


def first_blocks_ensemble(ckpt: Checkpoint, images: np.ndarray, k: int) -> np.ndarray:
    """softmax of the mean of log softmax(block t's logits at z = 0) over t <= k, in PyTorch (the model's rule)."""
    model = build_model("dt", ckpt.config)
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    mean = torch.tensor(ckpt.data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.data["std"]).view(1, -1, 1, 1)
    x = (torch.from_numpy(images) - mean) / std
    with torch.no_grad():
        z = torch.zeros(len(x), model.embedding.weight.shape[1])
        total = sum(torch.log_softmax(model.block(t)(x, z), dim=1) for t in range(1, k + 1))
        return torch.softmax(total / k, dim=1).numpy()


def test_an_ensemble_bundle_streams_the_one_graph_ensemble_and_exits_on_the_blocks_so_far(ensemble_exported,
                                                                                          exported, folder):
    """A federated checkpoint's bundle: every block sees z = 0 and the answer is the ensemble so far. Streamed,
    it gives the one-graph ensemble's answers; after k blocks, PyTorch's ensemble of blocks 1..k; the calibrated
    exit keeps its stated loss."""
    result, ckpt = ensemble_exported
    with zipfile.ZipFile(result.bundle) as zf:
        assert json.loads(zf.read("manifest.json"))["readout"] == "ensemble"
    images, _ = task_images(folder)
    full_probs, full_labels = EdgeModel(result.path, threads=1).run(images)
    chain_probs = EdgeModel(exported["fp32"].path, threads=1).run(images)[0]
    assert not np.allclose(full_probs, chain_probs, atol=1e-3)  # the two readouts differ: the test tells them apart
    streamed = BlockBundle(result.bundle, threads=1, preload=False)
    assert streamed.readout == "ensemble"
    for batch in (len(images), 7):
        probs, labels, used = streamed.run(images, batch_size=batch)
        np.testing.assert_array_equal(labels, full_labels)
        assert float(np.abs(probs - full_probs).max()) <= 1e-5 and (used == T).all()
    bundle = BlockBundle(result.bundle, threads=1)
    for k in range(1, T):
        probs, labels, used = bundle.run(images, ExitRule("blocks", blocks=k))
        assert (used == k).all()
        np.testing.assert_allclose(probs, first_blocks_ensemble(ckpt, images, k), atol=1e-5)
    x, y = holdout(folder)
    a, rule = result.anytime, bundle.default_rule()
    assert rule is not None and rule.threshold == a["threshold"]
    probs, labels, used = bundle.run(x, rule)
    full_x = EdgeModel(result.path, threads=1).run(x)[1]
    assert 100 * ((full_x == y).sum() - (labels == y).sum()) / len(y) <= 0.5 + 1e-9
    assert float(used.mean()) == pytest.approx(a["mean_blocks"])
    sim_labels, sim_used = exit_simulation(*bundle.all_block_probabilities(x), rule)
    np.testing.assert_array_equal(sim_labels, labels)
    np.testing.assert_array_equal(sim_used, used)
