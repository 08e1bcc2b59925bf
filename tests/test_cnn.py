"""The plain CNN (`--method cnn`), the FedAvg peer noprop-fl is compared against: it learns, refuses the NoProp
options it has no use for, survives a checkpoint, trains whole on a FedAvg client, exports to ONNX with parity,
and (tests/test_sim.py) runs in a real noprop-sim federation through Flower's FedAvg."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from synthetic import synthetic_data
from test_client_app import instruction, task_identity  # noqa: F401 - fixture
from test_export import run_onnx, task_images, torch_probs, write_task

from noprop.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from noprop.client.fedavg import train_whole_network
from noprop.cnn import CNN
from noprop.config import build_config
from noprop.data import LabelledData, load_train_test
from noprop.deploy.edge import ModelInfo
from noprop.deploy.export import ExportError, export_onnx, read_metadata
from noprop.federation import FederationConfig
from noprop.io import read_jsonl
from noprop.methods import METHODS, build_model, make_optimizer, model_config
from noprop.model_configs import CNNConfig
from noprop.ops.train_cli import main as train_main
from noprop.protocol import TrainInstructions
from noprop.records import arrays_to_record, record_to_arrays, to_numpy_state
from noprop.settings import SettingsError
from noprop.trainer import evaluate_accuracy, train_end_to_end_epoch

SMALL = {"channels": (8, 16, 16), "hidden": 32, "dropout": 0.0}


def small_cnn(input_shape=(1, 12, 12), num_classes: int = 4) -> CNN:
    return build_model("cnn", model_config("cnn", input_shape, num_classes, **SMALL))


def trained_cnn(train: LabelledData, epochs: int = 3) -> CNN:
    model = small_cnn(tuple(train.input_shape), train.num_classes)
    optimizer = make_optimizer("cnn", model.parameters(), 3e-3, 1e-3)
    for _ in range(epochs):
        train_end_to_end_epoch(model, optimizer, train, batch_size=32)
    return model.eval()


def test_registered_as_the_fedavg_peer():
    spec = METHODS["cnn"]
    assert spec.config_class is CNNConfig and spec.model_class is CNN and spec.optimizer == "adamw"
    assert not spec.continuous and "FedAvg peer" in spec.description
    assert isinstance(make_optimizer("cnn", small_cnn().parameters(), 1e-3, 1e-3), torch.optim.AdamW)


def test_model_is_one_blocks_x_path_then_relu_and_linear():
    model = small_cnn()
    layers = [type(m).__name__ for m in model.features]
    assert layers[-3:] == ["Flatten", "Linear", "BatchNorm1d"]
    assert layers.count("Conv2d") == 3 and layers.count("MaxPool2d") == 2
    assert [type(m).__name__ for m in model.classifier] == ["ReLU", "Linear"]
    assert model.classifier[1].in_features == 32 and model.classifier[1].out_features == 4
    tabular = small_cnn((20,), 3)
    assert type(tabular.features[-1]).__name__ == "BatchNorm1d" and tabular.features[0].in_features == 20
    probs = tabular.predict_proba(torch.randn(5, 20))
    assert probs.shape == (5, 3) and torch.allclose(probs.sum(1), torch.ones(5))


def test_learns_the_synthetic_task():
    """It reaches 100% in 3 epochs on every seed tried (chance: 25%); the floor leaves room for an unlucky seed."""
    train, test = synthetic_data(512, seed=1), synthetic_data(256, seed=2)
    model = trained_cnn(train)
    assert evaluate_accuracy(model, test) > 0.95
    # no noise anywhere: the stochastic mode is the deterministic one
    assert evaluate_accuracy(model, test, "stochastic") == evaluate_accuracy(model, test)
    with pytest.raises(ValueError, match="mode must be"):
        model.predict(test.x[:2], mode="noisy")


@pytest.mark.parametrize("embedding", ["learned:20", "prototype"])
def test_refuses_an_embedding_it_does_not_have(embedding):
    with pytest.raises(ValueError, match="the cnn method has no class embedding: leave embedding at one-hot") as exc:
        model_config("cnn", (1, 12, 12), 4, embedding=embedding)
    assert "\n" not in str(exc.value)
    with pytest.raises(SettingsError, match="no class embedding"):  # noprop-train's path
        build_config(None, {"method": "cnn", "embedding": embedding}).model_config((1, 12, 12), 4)
    with pytest.raises(ValueError, match="no class embedding"):  # a federation's, before any process starts
        FederationConfig(method="cnn", embedding=embedding).validate()


def test_refuses_the_radial_head_and_embedding_rows():
    with pytest.raises(ValueError, match="leave head at softmax"):
        model_config("cnn", (1, 12, 12), 4, head="radial")
    with pytest.raises(ValueError, match="no class embedding to initialise"):
        CNN(CNNConfig((1, 12, 12), 4), torch.zeros(4, 144))


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    train, test = synthetic_data(256, seed=1), synthetic_data(64, seed=2)
    model = trained_cnn(train, epochs=1)
    path = save_checkpoint(tmp_path / "cnn.pt", Checkpoint(method="cnn", config=model.cfg,
                                                          state_dict=model.state_dict(), data=train.describe()))
    ckpt = load_checkpoint(path)
    assert ckpt.method == "cnn" and ckpt.config == model.cfg and isinstance(ckpt.config, CNNConfig)
    assert torch.equal(ckpt.model().predict_proba(test.x), model.predict_proba(test.x))


def test_noprop_train_method_cnn(tmp_path, capsys):
    dataset = write_task(tmp_path)
    out = tmp_path / "run"
    code = train_main(["--method", "cnn", "--dataset", dataset, "--epochs", "2", "--out", str(out), "--channels",
                       "8,16,16", "--hidden", "32", "--batch-size", "32", "--lr", "3e-3", "--dropout", "0",
                       "--threads", "1"])
    assert code == 0
    assert "cnn on" in capsys.readouterr().out
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["test_acc_deterministic"] > 0.9
    ckpt = load_checkpoint(out / "checkpoint.pt")
    _, test = load_train_test(dataset)
    acc = (ckpt.model().predict(test.x) == test.y).float().mean().item()
    assert acc == pytest.approx(records[-1]["test_acc_deterministic"], abs=1e-6)
    assert train_main(["--method", "cnn", "--steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "cnn is one network call" in capsys.readouterr().err


def test_fedavg_client_trains_the_whole_network_and_returns_exactly_its_keys():
    data = synthetic_data(200, seed=3)
    model_cfg = FederationConfig(method="cnn", channels="8,16,16", hidden=32, dropout=0.0).model_config((1, 12, 12), 4)
    state = to_numpy_state(build_model("cnn", model_cfg).state_dict())
    config = ConfigRecord({"method": "cnn", "model-config": json.dumps(model_cfg.to_dict()), "local-epochs": 1,
                           "lr": 3e-3, "weight-decay": 0.0, "batch-size": 32, "seed": 0, "round": 1})
    content = RecordDict({"arrays": arrays_to_record(state), "config": config})
    node = SimpleNamespace(name="node-5", device=torch.device("cpu"))  # the NodeSettings parts a trainer reads
    reply = train_whole_network(TrainInstructions.from_record(config), content, node, data)
    got = record_to_arrays(reply["arrays"])
    assert list(got) == list(state)  # exactly the keys it got, in their order
    assert all(got[k].shape == state[k].shape and got[k].dtype == state[k].dtype for k in state)
    floats = [k for k in state if state[k].dtype.kind == "f"]
    assert all(not np.array_equal(got[k], state[k]) for k in floats), "every float tensor is trained"
    metrics = reply["metrics"]
    assert metrics["num-examples"] == 200 and metrics["round"] == 1 and np.isfinite(metrics["train-loss"])


def test_export_is_one_onnx_file_with_parity(tmp_path):
    dataset = write_task(tmp_path)
    train, _ = load_train_test(dataset)
    model = trained_cnn(train, epochs=2)
    ckpt = Checkpoint(method="cnn", config=model.cfg, state_dict=model.state_dict(), data=train.describe(),
                      metrics={"epoch": 2})
    out = export_onnx(ckpt, tmp_path / "cnn.onnx")
    assert sorted(p.name for p in tmp_path.glob("cnn*")) == ["cnn.manifest.json", "cnn.onnx"]
    images, labels = task_images(tmp_path)
    rng = np.random.default_rng(5)
    for raw in (images[:1], np.concatenate([images[:4], rng.random((3, 1, 12, 12), dtype=np.float32)])):
        probs, predicted = run_onnx(out, raw)
        ref = torch_probs(ckpt, raw)
        np.testing.assert_array_equal(predicted, ref.argmax(1))
        assert np.abs(probs - ref).max() <= 1e-5
    probs, _ = run_onnx(out, images)
    assert (probs.argmax(1) == labels).mean() > 0.9
    info = ModelInfo.from_metadata(read_metadata(out))
    assert (info.method, info.T, info.schedule, info.mode, info.steps) == ("cnn", 1, {"kind": "none"},
                                                                           "deterministic", 0)
    with pytest.raises(ExportError, match="draws no noise at inference: export it in deterministic mode"):
        export_onnx(ckpt, tmp_path / "noisy.onnx", mode="stochastic")
    with pytest.raises(ExportError, match="cnn checkpoint is one network call"):
        export_onnx(ckpt, tmp_path / "steps.onnx", steps=3)


