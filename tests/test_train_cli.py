"""noprop-train end to end on a synthetic .npz, its config file handling, its errors, and checkpoints."""

import json

import numpy as np
import pytest
import torch
from synthetic import synthetic_arrays

from noprop.checkpoint import CheckpointError, load_checkpoint
from noprop.config import build_config
from noprop.data import load_train_test
from noprop.io import read_jsonl
from noprop.ops.train_cli import main
from noprop.settings import SettingsError

FAST = ["--T", "3", "--channels", "8,16,16", "--hidden", "64", "--batch-size", "32", "--lr", "3e-3", "--dropout", "0",
        "--threads", "1"]


@pytest.fixture
def npz(tmp_path):
    x, y = synthetic_arrays(800, seed=1)
    xt, yt = synthetic_arrays(200, seed=2)
    path = tmp_path / "task.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_cli_trains_and_writes_metrics_checkpoint_and_plot(tmp_path, npz, method, capsys):
    out = tmp_path / "run"
    code = main(["--method", method, "--dataset", f"npz:{npz}", "--epochs", "4", "--out", str(out), *FAST])
    assert code == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # chance: 0.25; measured 1.00 (dt) and 0.74 (backprop) at these settings
    floor = {"dt": 0.9, "backprop": 0.7}[method]
    assert records[-1]["test_acc_deterministic"] > floor and "test_acc_stochastic" in records[-1], records[-1]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.method == method and ckpt.config.T == 3 and ckpt.extra["epoch"] == 4
    _, test = load_train_test(f"npz:{npz}")
    model = ckpt.model()
    acc = (model.predict(test.x) == test.y).float().mean().item()
    assert acc == pytest.approx(records[-1]["test_acc_deterministic"], abs=1e-6)
    assert "test acc" in capsys.readouterr().out


def test_toml_config_is_read_and_flags_override_it(tmp_path, npz):
    toml = tmp_path / "run.toml"
    toml.write_text(f'dataset = "npz:{npz}"\nepochs = 7\nembedding = "learned:5"\nchannels = [4, 8, 8]\n')
    cfg = build_config(toml, {"epochs": 1, "T": None})
    assert cfg.epochs == 1 and cfg.embedding == "learned:5" and cfg.channels == (4, 8, 8) and cfg.T == 10
    toml.write_text("epochz = 3\n")
    with pytest.raises(SettingsError, match="unknown key 'epochz'"):
        build_config(toml, {})


@pytest.mark.parametrize("argv, message", [
    (["--T", "0"], "T=0: must be at least 1"),
    (["--embedding", "learned:0"], "positive dimension"),
    (["--clip", "0.9"], "clip"),
    (["--dataset", "npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["--dataset", "imagenet"], "imagenet"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_input_is_one_line_error_and_exit_2(tmp_path, npz, argv, message, capsys):
    args = ["--dataset", f"npz:{npz}", "--epochs", "1", "--out", str(tmp_path / "r"), *FAST, *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_corrupt_checkpoint_is_detected(tmp_path, npz):
    out = tmp_path / "run"
    assert main(["--dataset", f"npz:{npz}", "--epochs", "1", "--out", str(out), *FAST]) == 0
    path = out / "checkpoint.pt"
    blob = bytearray(path.read_bytes())
    (tmp_path / "torn.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="torn.pt"):
        load_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "foreign.pt").write_text(json.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "foreign.pt")


@pytest.mark.parametrize("method", ["dt", "backprop"])
def test_resume_loads_the_checkpoint_and_continues_as_if_never_stopped(tmp_path, npz, method, monkeypatch, capsys):
    """2 epochs, then --resume to 3: training restarts from the checkpoint's model bit for bit, at epoch 3, with
    the optimizers' and RNG state, so the result is the uninterrupted 3-epoch run's exactly."""
    base = ["--method", method, "--dataset", f"npz:{npz}", *FAST]
    assert main([*base, "--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "resumed"
    assert main([*base, "--epochs", "2", "--out", str(out)]) == 0
    saved = load_checkpoint(out / "checkpoint.pt")
    from noprop.ops import train_cli

    first: dict = {}
    real = train_cli.BlockTrainer.train_block_epoch if method == "dt" else train_cli.train_end_to_end_epoch

    def spy(*args, **kwargs):  # the model's state when training goes on
        model = args[0].model if method == "dt" else args[0]
        first.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()})
        return real(*args, **kwargs)

    monkeypatch.setattr(train_cli.BlockTrainer if method == "dt" else train_cli,
                        "train_block_epoch" if method == "dt" else "train_end_to_end_epoch", spy)
    capsys.readouterr()
    assert main([*base, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert first["state"].keys() == saved.state_dict.keys()
    assert all(torch.equal(first["state"][k], v) for k, v in saved.state_dict.items())
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    done, straight = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert done.extra["epoch"] == 3
    assert all(torch.equal(straight.state_dict[k], v) for k, v in done.state_dict.items())
    assert records[-1]["test_acc_deterministic"] == read_jsonl(tmp_path / "straight" / "metrics.jsonl")[-1][
        "test_acc_deterministic"]


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e-2"], "other settings (lr)"),
    (["--hidden", "32"], "other settings (the model)"),
    (["--method", "backprop"], "other settings (the model)"),
])
def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, npz, argv, message, capsys):
    base = ["--dataset", f"npz:{npz}", "--out", str(tmp_path / "run"), *FAST]
    assert main([*base, "--epochs", "1"]) == 0
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.pt", "config.json",
                                                                        "metrics.jsonl")}
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--resume", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before  # the run is untouched
    assert main(["--dataset", f"npz:{npz}", "--epochs", "1", "--resume", *FAST]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
