"""Prototype embeddings (issue 12): the rows' scale against the schedule's noise, and the rows' learning rate."""

import json

import numpy as np
import pytest
import torch
from synthetic import synthetic_arrays, synthetic_data

from noprop.checkpoint import load_checkpoint
from noprop.diagnostics import label_from_z_accuracy
from noprop.methods import build_model, make_optimizer, model_config
from noprop.model import NoPropDT, prototype_rows, scale_prototypes
from noprop.model_configs import NoPropConfig
from noprop.ops.train_cli import main
from noprop.schedule import CosineSchedule
from noprop.trainer import BlockTrainer, OptimConfig, param_groups

SMALL = {"input_shape": (1, 12, 12), "num_classes": 4, "channels": (8, 16, 16), "hidden": 64}


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_unit_prototypes_give_the_label_away_no_sooner_than_one_hot():
    """Cause 1: raw normalised images lie so far apart against unit-variance noise that z_1 alone names the label
    (so blocks 2..T learn to copy z, not read x); scaled to unit mean norm they name it as late as one-hot does."""
    data = synthetic_data(256)
    raw = prototype_rows(data.x, data.y, 4)
    unit, factor = scale_prototypes(raw, "unit")
    schedule = CosineSchedule(T=10)
    one_hot = label_from_z_accuracy(torch.eye(4), schedule, generator=gen())
    leak_raw = label_from_z_accuracy(raw, schedule, generator=gen())
    leak_unit = label_from_z_accuracy(unit, schedule, generator=gen())
    assert leak_raw[1] > 0.75 and one_hot[1] < 0.4  # measured: 0.81 against 0.29 (chance 0.25)
    for t, (u, o) in enumerate(zip(leak_unit, one_hot), start=1):
        assert u <= o + 0.08, f"block {t}: z gives the label away {u:.2f} of the time, one-hot {o:.2f}"
    assert unit.norm(dim=1).mean() == pytest.approx(1.0, abs=1e-5)
    assert factor == pytest.approx(1 / raw.norm(dim=1).mean().item(), rel=1e-5)
    # one factor for every row: the images keep their geometry (distance ratios)
    assert torch.allclose(torch.cdist(unit, unit), factor * torch.cdist(raw, raw), atol=1e-4)
    kept, one = scale_prototypes(raw, "image")
    assert one == 1.0 and torch.equal(kept, raw)
    with pytest.raises(ValueError, match="unknown prototype scale"):
        scale_prototypes(raw, "huge")


def train_dt_blocks(init: torch.Tensor, lr_scale: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = NoPropDT(NoPropConfig(embedding="prototype", embedding_lr_scale=lr_scale, **SMALL), init)
    trainer = BlockTrainer(model, OptimConfig(batch_size=32))
    data = synthetic_data(256)
    for t in range(1, model.T + 1):
        trainer.train_block_epoch(t, data)
    return model.embedding.weight.detach()


def test_unit_prototype_rows_move_relative_to_their_size_as_raw_rows_do():
    """Cause 2: Adam moves every entry by about lr whatever its size, so unit rows (entries 12x smaller here, 25x on
    Fashion-MNIST) trained at the full lr lose their shape (on Fashion-MNIST two classes ended 0.016 apart after one
    epoch); at lr x the scale factor they move, relative to their size, as little as the raw rows would."""
    data = synthetic_data(256)
    unit, factor = scale_prototypes(prototype_rows(data.x, data.y, 4))
    scaled = train_dt_blocks(unit, factor)
    full = train_dt_blocks(unit, 1.0)
    drift = ((scaled - unit).norm() / unit.norm()).item()
    drift_full = ((full - unit).norm() / unit.norm()).item()
    assert drift < 0.05, drift  # measured 0.012
    assert drift_full > 0.1, drift_full  # measured 0.20: the failure the scale prevents
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.cdist(scaled, scaled)[off].min() > 0.9 * torch.cdist(unit, unit)[off].min()


def test_the_rows_learning_rate_reaches_every_optimizer_and_survives_a_checkpoint(tmp_path):
    data = synthetic_data(32)
    unit, factor = scale_prototypes(prototype_rows(data.x, data.y, 4))
    for method in ("dt", "backprop", "ct", "fm", "adjoint"):
        cfg = model_config(method, (1, 12, 12), 4, embedding="prototype", channels=(8, 16, 16), hidden=64,
                           embedding_lr_scale=factor)
        model = build_model(method, cfg, unit)
        if method == "dt":
            optimizer = BlockTrainer(model, OptimConfig(lr=2e-3)).shared_optimizer
        else:
            optimizer = make_optimizer(method, model.parameters(), 2e-3, 1e-3)
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        W = model.embedding.weight
        assert lrs[id(W)] == pytest.approx(2e-3 * factor), method
        assert all(lr == 2e-3 for pid, lr in lrs.items() if pid != id(W)), method
        assert len(lrs) == len(list(model.parameters() if method != "dt" else model.shared_parameters()))
    # one-hot and learned rows keep the full rate
    assert [g["lr"] for g in param_groups(NoPropDT(NoPropConfig(**SMALL)).parameters(), 1e-3)] == [1e-3]

    # noprop-train records the factor in the model config, so a resumed or exported model trains the same way
    xs, ys = synthetic_arrays(64)
    np.savez(tmp_path / "d.npz", x_train=xs, y_train=ys, x_test=xs[:16], y_test=ys[:16])
    for scale in ("unit", "image"):
        out = tmp_path / scale
        assert main(["--dataset", f"npz:{tmp_path / 'd.npz'}", "--embedding", "prototype", "--prototype-scale", scale,
                     "--epochs", "1", "--T", "2", "--channels", "4,4,4", "--hidden", "16", "--out", str(out)]) == 0
        ckpt = load_checkpoint(out / "checkpoint.pt")
        W = ckpt.model().embedding.weight
        norm = W.detach().norm(dim=1).mean().item()
        assert json.loads((out / "config.json").read_text())["prototype_scale"] == scale
        if scale == "unit":
            assert ckpt.config.embedding_lr_scale < 0.5 and W.lr_scale == ckpt.config.embedding_lr_scale
            assert norm == pytest.approx(1.0, abs=0.1)  # one epoch at the scaled rate
        else:
            assert ckpt.config.embedding_lr_scale == 1.0 and not hasattr(W, "lr_scale")
            assert norm > 5


@pytest.mark.parametrize("method", ["dt", "backprop", "ct", "fm", "adjoint"])
def test_prototype_z_path_conv_reads_z_as_an_image_and_linear_as_a_vector(method):
    """The paper reads an image-sized z with a conv path; "linear" gives it the FC path every other embedding has.
    On Fashion-MNIST the conv path's deterministic chain fell to 59% (its ReLU'd 3x3 patches of a noise-free z look
    nothing like the noisy z it trained on) against 80% for the FC path, stochastic 76% for both (BENCHMARKS.md)."""
    data = synthetic_data(16)
    init, factor = scale_prototypes(prototype_rows(data.x, data.y, 4))
    for z_path in ("conv", "linear"):
        cfg = model_config(method, (1, 12, 12), 4, embedding="prototype", channels=(8, 16, 16), hidden=64,
                           embedding_lr_scale=factor, prototype_z_path=z_path)
        model = build_model(method, cfg, init)
        block = model.block(1) if method == "dt" else model.blocks[0] if method == "backprop" else model.block
        convs = [m for m in block.z_path.modules() if isinstance(m, torch.nn.Conv2d)]
        assert bool(convs) == (z_path == "conv") and (block.z_image_shape is None) == (z_path == "linear")
        first = next(m for m in block.z_path.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        assert (first.in_channels if z_path == "conv" else first.in_features) == (1 if z_path == "conv" else 144)
        proba = model.predict_proba(data.x, "stochastic", gen())
        assert proba.shape == (16, 4) and torch.isfinite(proba).all()
    with pytest.raises(ValueError, match="unknown prototype_z_path"):
        NoPropConfig(embedding="prototype", prototype_z_path="attention", **SMALL)


def test_each_method_resolves_its_measured_prototype_defaults():
    from noprop.config import TrainConfig
    from noprop.settings import SettingsError

    got = {m: (c.prototype_scale, c.prototype_z_path) for m in ("dt", "ct", "fm", "backprop", "adjoint")
           for c in [TrainConfig(method=m, embedding="prototype").validate()]}
    assert got == {"dt": ("unit", "linear"), "ct": ("unit", "linear"), "fm": ("image", "conv"),
                   "backprop": ("image", "conv"), "adjoint": ("image", "conv")}
    explicit = TrainConfig(method="dt", embedding="prototype", prototype_scale="image", prototype_z_path="conv")
    assert (explicit.validate().prototype_scale, explicit.prototype_z_path) == ("image", "conv")
    assert explicit.model_config((1, 12, 12), 4).prototype_z_path == "conv"
    with pytest.raises(SettingsError, match="prototype_scale='huge'"):
        TrainConfig(prototype_scale="huge").validate()
    # a checkpoint written before the option existed rebuilds the paper's conv path
    old = NoPropConfig(embedding="prototype", **SMALL).to_dict()
    del old["prototype_z_path"], old["embedding_lr_scale"]
    assert NoPropConfig.from_dict(old).prototype_z_path == "conv"
