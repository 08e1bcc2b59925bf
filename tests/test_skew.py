"""Against forgetting under label skew (issue 21): the classes a node reports in discovery, the plan that uses
them, the coverage step that keeps an owner of few classes from overwriting a block, and the ensemble readout
that lets no single block decide."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from procs import write_synthetic_npz
from run_helpers import LocalGrid
from test_client_app import task_identity  # noqa: F401 - fixture
from torch import nn

from noprop.checkpoint import Checkpoint, resume_mismatch
from noprop.client.handlers import held_classes
from noprop.data import LabelledData
from noprop.diagnostics import chain_diagnostics
from noprop.federation import FederationConfig
from noprop.model import NoPropDT
from noprop.model_configs import NoPropConfig
from noprop.server.run import FederatedRun

T = 2


@pytest.mark.unit
def test_a_node_reports_the_classes_it_holds_not_their_counts():
    y = torch.tensor([0] * 500 + [3] * 480 + [7] * 19 + [9] * 1)  # 7 is 1.9% of 1000, 9 one example
    assert held_classes(y, 10) == [0, 3]
    assert held_classes(torch.arange(10).repeat(5), 10) == list(range(10))
    # 100 even classes (1% each) are all held: the bar is a fifth of an even share, not a fixed 2%
    assert held_classes(torch.arange(100).repeat(3), 100) == list(range(100))


def skewed_run(tmp_path, **kw) -> tuple[FederatedRun, LocalGrid]:
    """4 nodes of one class each (classes:1 of a 4-class task), T = 2: each block gets 2 owners a round."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    npz = write_synthetic_npz(tmp_path / "task.npz", n_train=400, n_test=100)
    cfg = FederationConfig(T=T, num_rounds=2, min_nodes=4, channels="4,8,8", hidden=16, dropout=0.0, batch_size=64,
                           min_local_steps=0, head_steps=10, eval_limit=0, eval_in_background=False,
                           join_timeout=0.01, dataset=f"npz:{npz}", partition_type="classes:1",
                           out=str(tmp_path / "out"), **{"coverage_step": True, "label_aware": True, **kw})
    grid = LocalGrid(npz, 4, cfg.to_run_config())
    return FederatedRun(grid, cfg, log=lambda _: None), grid


def owners_classes(fed: FederatedRun, record: dict) -> dict[str, set[int]]:
    caps = fed.strategy.capacities
    return {t: set().union(*(caps[n].classes for n in owners)) for t, owners in record["plan"].items()}


@pytest.mark.sim
def test_discovery_carries_each_nodes_classes_and_the_plan_pairs_owners_that_differ(tmp_path):
    fed, _ = skewed_run(tmp_path)
    record = fed.run_round(1, first=True)
    assert sorted(c for cap in fed.strategy.capacities.values() for c in cap.classes) == [0, 1, 2, 3]
    assert all(len(cap.classes) == 1 for cap in fed.strategy.capacities.values())
    # two owners a block, one class each: together they must hold two classes, never one class twice
    assert all(len(c) == 2 for c in owners_classes(fed, record).values()), record["plan"]
    # a block's first owners take the full step; what they held is recorded for the next rounds' steps
    assert "block_step" not in record
    assert {t: len(c) for t, c in record["block_classes"].items()} == {"1": 2, "2": 2}


@pytest.mark.sim
def test_a_resumed_run_steps_as_the_uninterrupted_one(tmp_path):
    fed, grid = skewed_run(tmp_path)
    fed.run_round(1, first=True)
    resumed = FederatedRun(grid, FederationConfig(**{**fed.cfg.__dict__, "resume": True}), log=lambda _: None)
    assert resumed.strategy.block_classes == fed.strategy.block_classes and resumed.round == 1
    assert resumed.run_round(2)["block_step"] == {"1": 0.5, "2": 0.5}


@pytest.mark.sim
def test_the_coverage_step_keeps_half_of_what_a_block_had(tmp_path):
    """Two like runs; in round 2 one takes the coverage step and the other the owners' full mean (the same replies:
    the same seeds and start): the stepped block is exactly halfway between the block before and the full one."""
    steps = {}
    for step in (True, False):
        fed, _ = skewed_run(tmp_path / str(step))
        fed.run_round(1, first=True)
        before = {k: v.copy() for k, v in fed.strategy.global_state.items()}
        fed.strategy.cfg.coverage_step = step
        record = fed.run_round(2)
        steps[step] = (before, fed.strategy.global_state, record)
    (before, stepped, record), (before_full, full, record_full) = steps[True], steps[False]
    assert record["block_step"] == {"1": 0.5, "2": 0.5} and "block_step" not in record_full
    keys = [k for k in before if k.startswith("blocks.") and before[k].dtype == np.float32]
    assert all(np.array_equal(before[k], before_full[k]) for k in keys)  # alike up to round 2
    for k in keys:
        assert np.allclose(stepped[k], before[k] + 0.5 * (full[k] - before[k]), atol=1e-6), k
    assert any(not np.allclose(stepped[k], full[k]) for k in keys)


# -- the ensemble readout (--readout ensemble, the federation's default) -------------------------------------------


class LeaningBlock(nn.Module):
    """What an owner of one class leaves behind: logits that read the class from the image (+3 on the true class,
    given one-hot as the input features) and lean by `lean` to the owner's class, whatever the image."""

    def __init__(self, owner_class: int, lean: float):
        super().__init__()
        self.owner_class, self.lean = owner_class, lean

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logits = 3.0 * x.clone()
        logits[:, self.owner_class] += self.lean
        return logits


M = 4
LEAN_CFG = NoPropConfig(input_shape=(M,), num_classes=M, T=M, hidden=4, z_skip=True)


def leaning_model(readout: str, lean: float = 8.0) -> NoPropDT:
    """Block t last trained by an owner of class t - 1 only: every block leans to a different class."""
    model = NoPropDT(replace(LEAN_CFG, readout=readout)).eval()
    model.blocks = nn.ModuleDict({str(t): LeaningBlock(t - 1, lean) for t in range(1, M + 1)})
    return model


def one_hot_images(n: int) -> LabelledData:
    y = torch.arange(M).repeat(n)
    return LabelledData(x=F.one_hot(y, M).float(), y=y, classes=[f"c{i}" for i in range(M)], mean=[0.0],
                        std=[1.0], name="lean")


@pytest.mark.unit
def test_the_ensemble_cancels_the_leans_that_the_chain_follows():
    """Each block leans to its last owner's class by more than the image tells it. The chain follows the leans
    from block to block and ends on the last one; the ensemble weighs every block alike, so the leans cancel."""
    data = one_hot_images(25)
    chain = chain_diagnostics(leaning_model("chain"), data)
    ensemble = chain_diagnostics(leaning_model("ensemble"), data)
    assert chain["accuracy"] <= 0.5 and min(chain["class_accuracy"].values()) == 0.0, chain
    assert ensemble["accuracy"] == 1.0 and set(ensemble["class_accuracy"].values()) == {1.0}, ensemble
    assert torch.equal(leaning_model("ensemble").predict(data.x), data.y)  # what an export or noprop-edge gives
    assert (leaning_model("chain").predict(data.x) == data.y).float().mean() <= 0.5
    # the same weights, both readouts, whichever the model uses: the server records both every round
    for d in (chain, ensemble):
        assert (d["chain_accuracy"], d["ensemble_accuracy"]) == (chain["accuracy"], ensemble["accuracy"])
    # with leans the image outweighs, both read the images right: the ensemble is no trick of the construction
    assert chain_diagnostics(leaning_model("chain", lean=1.0), data)["accuracy"] == 1.0


@pytest.mark.unit
def test_the_ensemble_is_the_mean_of_the_blocks_log_posteriors_from_the_image_alone():
    torch.manual_seed(0)
    cfg = NoPropConfig(input_shape=(1, 8, 8), num_classes=M, T=3, channels=(4, 8, 8), hidden=16, z_skip=True,
                       readout="ensemble")
    model = NoPropDT(cfg).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        z0 = torch.zeros(5, cfg.embedding_dim)
        expected = F.softmax(torch.stack([F.log_softmax(model.block(t)(x, z0), 1) for t in (1, 2, 3)]).mean(0), 1)
        assert torch.allclose(model(x), expected, atol=1e-6)
        # no head, no noise: a scrambled head or drawn noise change nothing
        nn.init.normal_(model.head.linear.weight, std=3.0)
        assert torch.allclose(model(x, torch.randn(4, 5, cfg.embedding_dim)), expected, atol=1e-6)
        assert torch.equal(model.predict(x, mode="stochastic"), expected.argmax(1))
    with pytest.raises(RuntimeError, match="needs all 3 blocks"):
        NoPropDT(cfg, owned_blocks=[1, 2]).eval()(x)
    with pytest.raises(ValueError, match="unknown readout 'vote'"):
        replace(cfg, readout="vote")


@pytest.mark.unit
@pytest.mark.parametrize("share", [0.0, 0.5])
def test_z_dropout_shows_a_share_of_each_batch_z_zero_in_training_only(share):
    """--z-dropout trains block t on rows whose z_{t-1} is 0, the input the ensemble readout gives it."""
    cfg = NoPropConfig(input_shape=(6,), num_classes=M, T=3, hidden=8, z_skip=True, z_dropout=share)
    model = NoPropDT(cfg)
    seen = []
    model.block(2).register_forward_hook(lambda _m, args, _out: seen.append(args[1].detach().clone()))
    y = torch.arange(M).repeat(500)
    model.block_loss(2, torch.randn(len(y), 6), y, torch.Generator().manual_seed(0))
    zero_rows = (seen[-1] == 0).all(dim=1).float().mean().item()
    assert zero_rows == pytest.approx(share, abs=0.05)
    with pytest.raises(ValueError, match="z_dropout must lie in"):
        replace(cfg, z_dropout=1.0)


@pytest.mark.unit
def test_a_run_resumes_a_checkpoint_of_the_other_readout():
    """The readout is inference only: a run started before --readout (the chain) goes on with the ensemble."""
    chain = NoPropConfig(input_shape=(6,), num_classes=M, T=3, hidden=8, z_skip=True)
    ckpt = Checkpoint(method="dt", config=chain, state_dict={})
    assert resume_mismatch(ckpt, "dt", replace(chain, readout="ensemble")) is None
    assert "other settings" in resume_mismatch(ckpt, "dt", replace(chain, readout="ensemble", hidden=16))
