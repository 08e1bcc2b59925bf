"""Issue 10's instruments and mechanisms: chain diagnostics, the server-trained head, balanced softmax on skewed
shards, pooled BatchNorm variance, per-node seeds, a minimum of local steps, LayerNorm blocks."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from noprop.data import LabelledData
from noprop.diagnostics import chain_diagnostics, chain_readouts
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.server.aggregate import Reply, aggregate, pooled_variance
from noprop.server.planner import OwnershipPlan
from noprop.trainer import (
    BlockTrainer,
    OptimConfig,
    epochs_for_min_steps,
    fit_head,
    label_log_prior,
    node_seed,
)

M = 4
CFG = NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=3, channels=(4, 8, 8), hidden=16, dropout=0.0)


class OracleBlock(nn.Module):
    """A block that reads the class written into pixel (0, 0) of the image: a perfect denoiser, or, with
    shift, one that is always wrong by `shift` classes."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0].round().long() + self.shift) % M
        return 20.0 * nn.functional.one_hot(cls, M).float()


def labelled(y: torch.Tensor) -> LabelledData:
    x = torch.zeros(len(y), 1, 8, 8)
    x[:, 0, 0, 0] = y.float()
    return LabelledData(x=x, y=y, classes=[f"c{i}" for i in range(M)], mean=[0.0], std=[1.0], name="oracle")


def oracle_model(shifts=(0, 0, 0)) -> NoPropDT:
    model = NoPropDT(CFG)
    for t, shift in zip(range(1, CFG.T + 1), shifts):
        model.blocks[str(t)] = OracleBlock(shift)
    return model


def test_a_perfect_chain_reads_100_percent_at_every_stage():
    data = labelled(torch.arange(200) % M)
    d = chain_diagnostics(oracle_model(), data)
    assert d["accuracy"] == 1.0 and d["nearest_accuracy"] == 1.0
    assert d["block_accuracy"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert d["class_accuracy"] == {f"c{i}": 1.0 for i in range(M)}


def test_readouts_separate_a_wrong_block_and_a_wrong_head():
    data = labelled(torch.arange(200) % M)
    model = oracle_model(shifts=(1, 0, 0))  # block 1 always one class off; later blocks right
    d = chain_diagnostics(model, data)
    assert d["block_accuracy"]["1"] == 0.0 and d["block_accuracy"]["3"] == 1.0 and d["accuracy"] == 1.0
    with torch.no_grad():  # a head that reads class c as c + 1: the chain is right, the prediction wrong
        model.head.linear.weight.copy_(torch.roll(torch.eye(M), 1, dims=0))
        model.head.linear.bias.zero_()
    d = chain_diagnostics(model, data)
    assert d["nearest_accuracy"] == 1.0 and d["accuracy"] == 0.0


def test_readouts_take_no_labels():
    y = torch.arange(40) % M
    model = oracle_model()
    assert not set(inspect.signature(chain_readouts).parameters) & {"y", "labels", "target", "targets"}
    readouts = chain_readouts(model, labelled(y).x)
    assert torch.equal(readouts.head, y)  # read from the images alone
    shuffled = labelled(y)
    shuffled.y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    d = chain_diagnostics(model, shuffled)
    # scored against other labels, the readout did not move: the accuracy is its agreement with those labels
    assert d["accuracy"] == pytest.approx((readouts.head == shuffled.y).float().mean().item()) and d["accuracy"] < 0.6


def test_server_head_fit_uses_no_images_and_repairs_a_scrambled_head():
    model = oracle_model()

    def no_images(*_):
        raise AssertionError("fit_head ran a block: it must not need images")

    for t in range(1, CFG.T + 1):
        model.blocks[str(t)].forward = no_images
    torch.manual_seed(0)
    nn.init.normal_(model.head.linear.weight, std=3.0)  # a random head misreads z_T
    nn.init.normal_(model.head.linear.bias, std=3.0)
    parts = fit_head(model, steps=300, seed=0)
    assert parts["ce_after"] < 0.25 * parts["ce_before"], parts
    for t in range(1, CFG.T + 1):
        model.blocks[str(t)] = OracleBlock()
    assert chain_diagnostics(model, labelled(torch.arange(200) % M))["accuracy"] == 1.0


def test_head_starts_as_the_nearest_embedding_readout():
    model = NoPropDT(NoPropConfig(input_shape=(5,), num_classes=M, T=2, embedding="learned:6"))
    W = model.embedding.weight.detach()
    z = W[torch.arange(M)] * 0.9  # points nearer their own class embedding than any other
    assert torch.equal(model.head(z, W).argmax(1), torch.arange(M))


def block_prior_bias(log_prior: torch.Tensor | None) -> float:
    """Mean probability block 1 gives class 0 on balanced inputs after training on 90% class 0, where neither x
    nor z_0 carries the label (pure noise): all it can learn is the training prior, unless logits are adjusted."""
    torch.manual_seed(0)
    model = NoPropDT(CFG)
    trainer = BlockTrainer(model, OptimConfig(lr=3e-3, batch_size=64), blocks=[1])
    g = torch.Generator().manual_seed(1)
    y = torch.where(torch.rand(1024, generator=g) < 0.9, 0, torch.randint(1, M, (1024,), generator=g))
    x = torch.randn(1024, 1, 8, 8, generator=g)
    data = LabelledData(x=x, y=y, classes=[str(i) for i in range(M)], mean=[0.0], std=[1.0], name="skewed")
    for _ in range(6):
        trainer.train_block_epoch(1, data, log_prior=log_prior)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model.block(1)(torch.randn(512, 1, 8, 8, generator=g), torch.randn(512, M)), 1)
    return float(probs[:, 0].mean())


def test_balanced_softmax_keeps_a_skewed_shard_prior_out_of_the_block():
    y = torch.tensor([0] * 9 + [1])
    prior = label_log_prior(y, M)
    assert torch.allclose(prior.exp()[:2], torch.tensor([0.9, 0.1])) and torch.isfinite(prior).all()
    assert block_prior_bias(None) > 0.7  # without the adjustment the block learns the shard's label mix
    assert block_prior_bias(prior) < 0.45  # with it, close to the balanced 1/M


def test_pooled_variance_matches_numpy_on_the_concatenated_data():
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc, scale, size=(n, 3)) for loc, scale, n in ((0, 1, 100), (5, 2, 300), (-3, 0.5, 50))]
    means = [p.mean(0).astype(np.float32) for p in parts]
    variances = [p.var(0).astype(np.float32) for p in parts]
    pooled = pooled_variance(means, variances, [len(p) for p in parts])
    np.testing.assert_allclose(pooled, np.concatenate(parts).var(0), rtol=1e-5)
    linear = sum(v * len(p) for v, p in zip(variances, parts)) / sum(len(p) for p in parts)
    assert np.all(pooled > linear * 1.5)  # a linear mean of the variances misses the spread of the means


def test_aggregate_pools_batchnorm_running_variance_of_co_owners():
    state = {"blocks.1.bn.running_mean": np.zeros(2, np.float32), "blocks.1.bn.running_var": np.ones(2, np.float32),
             "head.linear.bias": np.zeros(2, np.float32)}
    plan = OwnershipPlan(round=0, policy="replicate", owners={1: (1, 2)}, assignments={1: (1,), 2: (1,)})
    replies = [Reply(node_id=n, num_examples=10, arrays={
        "blocks.1.bn.running_mean": np.full(2, m, np.float32), "blocks.1.bn.running_var": np.ones(2, np.float32),
        "head.linear.bias": np.zeros(2, np.float32)}) for n, m in ((1, -2.0), (2, 2.0))]
    new = aggregate(state, plan, replies)
    np.testing.assert_allclose(new["blocks.1.bn.running_mean"], 0.0)
    np.testing.assert_allclose(new["blocks.1.bn.running_var"], 5.0)  # 1 + 2^2, not 1


def test_every_node_and_round_trains_with_its_own_seed():
    seeds = {node_seed(0, rnd, node) for rnd in range(1, 6) for node in (3, 17, 2**63 + 5, 12345678901234567)}
    assert len(seeds) == 20 and all(0 <= s < 2**31 for s in seeds)
    assert node_seed(1, 1, 3) != node_seed(0, 1, 3)


def test_min_local_steps_raises_epochs_on_tiny_shards_only():
    assert epochs_for_min_steps(470, 128, 1, 50) == 13  # 4 batches an epoch
    assert epochs_for_min_steps(6000, 128, 1, 40) == 1  # 47 batches already
    assert epochs_for_min_steps(470, 128, 2, 0) == 2
    assert epochs_for_min_steps(129, 128, 1, 10) == 10  # the batch of one is dropped: one batch an epoch


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_layer_norm_blocks_keep_no_running_statistics(norm):
    model = NoPropDT(NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=2, channels=(4, 8, 8), hidden=16,
                                  norm=norm))
    buffers = [k for k in model.state_dict() if "running_" in k]
    assert bool(buffers) == (norm == "batch")
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == (norm == "batch")
    with pytest.raises(ValueError, match="unknown norm"):
        NoPropConfig(input_shape=(4,), num_classes=M, norm="group")


@pytest.mark.parametrize("embedding", ["one-hot", "learned:6"])
def test_z_skip_adds_the_exact_class_posterior_given_z(embedding):
    cfg = NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=4, channels=(4, 8, 8), hidden=16, embedding=embedding,
                       z_skip=True)
    model = NoPropDT(cfg)
    W = model.embedding.weight.detach()
    t = 3
    ab = model.schedule.alpha_bar_at(t - 1)
    z = model.schedule.sample_marginal(W[torch.arange(8) % M], t - 1, generator=torch.Generator().manual_seed(0))
    # log N(z; sqrt(ab) u_y, (1 - ab) I) per class, normalised over classes: the posterior under a uniform prior
    log_lik = -((z[:, None, :] - ab**0.5 * W[None]) ** 2).sum(-1) / (2 * (1 - ab))
    expected = torch.log_softmax(log_lik, dim=1)
    got = torch.log_softmax(model.z_posterior_logits(t, z), dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.eval()
    x = torch.zeros(8, 1, 8, 8)
    with torch.no_grad():
        plain = model.block(t)(x, z)
        torch.testing.assert_close(model.block_logits(t, x, z), plain + model.z_posterior_logits(t, z))
    off = NoPropDT(NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=4, channels=(4, 8, 8), hidden=16))
    off.eval()
    z_off = torch.randn(8, M)
    with torch.no_grad():
        assert torch.equal(off.block_logits(t, x, z_off), off.block(t)(x, z_off))  # the paper's block: logits alone


def last_block_reading_of_unseen_classes(z_skip: bool) -> torch.Tensor:
    """Train block T only on classes 0 and 1 (as its last owner under label skew), with images that carry no
    label, then ask it about z at the marginal mean of classes 2 and 3, which it never saw."""
    torch.manual_seed(0)
    cfg = NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=3, channels=(4, 8, 8), hidden=16, dropout=0.0,
                       z_skip=z_skip)
    model = NoPropDT(cfg)
    trainer = BlockTrainer(model, OptimConfig(lr=3e-3, batch_size=64), blocks=[cfg.T])
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (1024,), generator=g)
    data = LabelledData(x=torch.randn(1024, 1, 8, 8, generator=g), y=y, classes=[str(i) for i in range(M)],
                        mean=[0.0], std=[1.0], name="two classes")
    prior = label_log_prior(y, M)
    for _ in range(8):
        trainer.train_block_epoch(cfg.T, data, log_prior=prior)
    model.eval()
    W = model.embedding.weight.detach()
    z = model.schedule.alpha_bar_at(cfg.T - 1) ** 0.5 * W[torch.tensor([2, 3] * 16)]
    with torch.no_grad():
        return model.block_logits(cfg.T, torch.randn(32, 1, 8, 8, generator=g), z).argmax(1)


def test_z_skip_keeps_classes_the_last_owner_never_saw():
    unseen = torch.tensor([2, 3] * 16)
    assert (last_block_reading_of_unseen_classes(z_skip=True) == unseen).float().mean() > 0.9
    assert (last_block_reading_of_unseen_classes(z_skip=False) == unseen).float().mean() < 0.5  # the paper's block
