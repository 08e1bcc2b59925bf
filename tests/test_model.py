"""NoProp-DT's structure and training: independence of blocks, no label leakage, learning (spec 2, 3, 6)."""

import inspect

import pytest
import torch
from synthetic import synthetic_data

from noprop.baseline import BackpropChain
from noprop.model import NoPropDT, prototype_rows
from noprop.model_configs import NoPropConfig, parse_embedding
from noprop.trainer import (
    BlockTrainer,
    OptimConfig,
    evaluate_accuracy,
    train_end_to_end_epoch,
    train_owned_blocks,
)

SMALL = {"channels": (8, 16, 16), "hidden": 64, "dropout": 0.0}


def small_config(**kw) -> NoPropConfig:
    base = {"input_shape": (1, 12, 12), "num_classes": 4, "T": 4, **SMALL}
    base.update(kw)
    return NoPropConfig(**base)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_full_size_block_matches_figure_6():
    cfg = NoPropConfig(input_shape=(1, 28, 28), num_classes=10)
    model = NoPropDT(cfg)
    block = model.block(1)
    fc = [m for m in block.x_path if isinstance(m, torch.nn.Linear)][0]
    assert fc.in_features == 128 * 7 * 7 == 6272
    n = sum(p.numel() for p in block.parameters())
    assert 1.9e6 < n < 2.1e6, n
    assert len(model.blocks) == 10


@pytest.mark.parametrize("embedding", ["one-hot", "learned:20", "learned:3", "prototype"])
def test_after_a_step_on_block_t_every_other_block_is_bit_identical(embedding):
    cfg = small_config(embedding=embedding)
    data = synthetic_data(64, size=12)
    model = NoPropDT(cfg)
    trainer = BlockTrainer(model, OptimConfig(batch_size=32))
    # give every optimizer some state first, so stale Adam moments would show if they leaked
    for t in range(1, cfg.T + 1):
        trainer.step(t, data.x[:32], data.y[:32])
    before = [snapshot(b) for b in model.blocks.values()]
    trainer.step(2, data.x[32:], data.y[32:])
    for i, block in enumerate(model.blocks.values()):
        after = snapshot(block)
        changed = any(not torch.equal(before[i][k], after[k]) for k in after)
        assert changed == (i == 1), f"block {i + 1} changed={changed}"


def test_no_autograd_graph_links_two_blocks():
    cfg = small_config()
    data = synthetic_data(32)
    model = NoPropDT(cfg)
    loss, _ = model.block_loss(3, data.x, data.y)
    loss.backward()
    for i, block in enumerate(model.blocks.values()):
        grads = [p.grad for p in block.parameters()]
        if i == 2:
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
        else:
            assert all(g is None for g in grads), f"block {i + 1} received gradient from block 3's loss"
    # the graph of block 3's loss reaches only block 3's parameters, the head and W
    reachable = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None:
            continue
        if hasattr(fn, "variable"):
            reachable.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    other = {id(p) for i, b in enumerate(model.blocks.values()) if i != 2 for p in b.parameters()}
    assert not reachable & other


def test_ce_reads_z_T_from_the_posterior_not_from_the_last_block():
    """Mistake 2: block_loss's CE must train only the head and W, never a block. With eta = 0 the L2 term has no
    weight, so a block's gradient could only come from the CE (or the KL) reading what the block predicts."""
    cfg = small_config(embedding="learned:8", eta=0.0)
    model = NoPropDT(cfg)
    data = synthetic_data(32)
    loss, parts = model.block_loss(cfg.T, data.x, data.y)
    assert parts["ce"] > 0 and parts["l2"] > 0  # the block did predict: only its weight in the loss is 0
    model.zero_grad(set_to_none=True)
    loss.backward()
    block_params = list(model.blocks.named_parameters())
    assert block_params
    for name, p in block_params:
        assert p.grad is None or not p.grad.any(), f"the CE reached blocks.{name}"
    for name, p in [*model.head.named_parameters(), ("embedding.weight", model.embedding.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient from the CE"


def test_predict_takes_no_labels():
    params = set(inspect.signature(NoPropDT.predict).parameters)
    assert not params & {"y", "labels", "target", "targets"}
    assert not set(inspect.signature(NoPropDT.forward).parameters) & {"y", "labels", "target"}
    # and nothing reaches it another way: each image's prediction is the same alone as in any batch, and
    # predicting leaves the model as it was (no statistics of the batch kept)
    torch.manual_seed(0)
    model = NoPropDT(small_config())
    x = synthetic_data(12).x
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = model.predict_proba(x)
    alone = torch.cat([model.predict_proba(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(batch, alone, atol=1e-5), (batch - alone).abs().max()
    assert torch.equal(model.predict(x.flip(0)), model.predict(x).flip(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_predict_modes():
    model = NoPropDT(small_config())
    x = synthetic_data(16).x
    p1, p2 = model.predict_proba(x), model.predict_proba(x)
    assert torch.equal(p1, p2), "deterministic inference must be repeatable"
    assert torch.allclose(p1.sum(1), torch.ones(16))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = model.predict_proba(x, "stochastic", g1)
    s2 = model.predict_proba(x, "stochastic", g2)
    assert torch.equal(s1, s2) and not torch.equal(s1, p1)
    with pytest.raises(ValueError):
        model.predict_proba(x, "noisy")


def train_dt(cfg: NoPropConfig, data, epochs: int) -> NoPropDT:
    model = NoPropDT(cfg)
    trainer = BlockTrainer(model, OptimConfig(batch_size=32, lr=3e-3))
    train_owned_blocks(trainer, range(1, cfg.T + 1), data, epochs)
    return model


@pytest.mark.parametrize("embedding", ["one-hot", "learned:8"])
def test_noprop_dt_learns_the_synthetic_task(embedding):
    train, test = synthetic_data(512, seed=1), synthetic_data(256, seed=2)
    model = train_dt(small_config(embedding=embedding), train, epochs=3)
    acc_det = evaluate_accuracy(model, test, "deterministic")
    acc_sto = evaluate_accuracy(model, test, "stochastic")
    assert acc_det > 0.9, acc_det  # chance is 0.25
    assert acc_sto > 0.8, acc_sto


def test_shuffled_labels_give_chance_accuracy():
    # the chain never sees y: trained on labels unrelated to x, it cannot beat chance on held-out data
    train = synthetic_data(512, seed=1)
    shuffled = train.y[torch.randperm(len(train.y), generator=torch.Generator().manual_seed(3))]
    train = synthetic_data(512, seed=1, labels=shuffled.numpy())
    test = synthetic_data(1000, seed=2)
    model = train_dt(small_config(), train, epochs=2)
    acc = evaluate_accuracy(model, test)
    assert 0.15 < acc < 0.36, acc


def test_backprop_baseline_learns_the_synthetic_task():
    train, test = synthetic_data(512, seed=1), synthetic_data(256, seed=2)
    cfg = small_config()
    model = BackpropChain(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(3):
        train_end_to_end_epoch(model, opt, train, batch_size=32)
    assert evaluate_accuracy(model, test) > 0.9


def test_backprop_baseline_backpropagates_through_every_block():
    cfg = small_config()
    model = BackpropChain(cfg)
    data = synthetic_data(32)
    model.loss(data.x, data.y).backward()
    assert all(p.grad is not None for b in model.blocks for p in b.parameters())
    assert model.mix.grad is not None


@pytest.mark.parametrize("head", ["softmax", "radial"])
def test_tabular_inputs_train_with_either_head(head):
    from noprop.data import LabelledData

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 10, generator=g) * 0.5
    x[torch.arange(300), y] += 2.0
    data = LabelledData(x=x, y=y, classes=["a", "b", "c"], mean=[0.0], std=[1.0], name="tab")
    cfg = NoPropConfig(input_shape=(10,), num_classes=3, T=3, head=head, embedding="learned:6",
                       hidden=32, dropout=0.0)
    model = train_dt(cfg, data, epochs=6)
    assert evaluate_accuracy(model, data) > 0.85


def test_embedding_kinds():
    assert parse_embedding("one-hot") == ("one-hot", None)
    assert parse_embedding("learned:20") == ("learned", 20)
    for bad in ["learned", "learned:0", "learned:x", "one-hot:3", "spherical"]:
        with pytest.raises(ValueError):
            parse_embedding(bad)
    one_hot = NoPropDT(small_config())
    assert torch.equal(one_hot.embedding.weight, torch.eye(4)) and not one_hot.embedding.weight.requires_grad
    learned = NoPropDT(small_config(embedding="learned:8")).embedding.weight
    assert torch.allclose(learned @ learned.T, torch.eye(4), atol=1e-5), "orthonormal rows when d >= m"
    with pytest.raises(ValueError):
        NoPropConfig(input_shape=(10,), num_classes=3, embedding="prototype")


def test_prototype_is_the_image_with_smallest_median_distance():
    x = torch.tensor([[0.0], [1.0], [1.1], [5.0], [10.0], [10.2], [30.0]]).reshape(7, 1, 1, 1)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    rows = prototype_rows(x, y, 2)
    # class 0: median distance to the others 1.1 (for 0.0), 1.0 (for 1.0), 1.1 (for 1.1), 4.0 (for 5.0)
    assert rows[0].item() == 1.0
    # class 1: the outlier 30.0 must not be picked
    assert rows[1].item() in (10.0, pytest.approx(10.2))
    cfg = small_config(embedding="prototype")
    data = synthetic_data(64)
    init = prototype_rows(data.x, data.y, 4)
    model = NoPropDT(cfg, embedding_init=init)
    assert model.embedding.weight.shape == (4, 144) and model.embedding.weight.requires_grad
    assert torch.equal(model.embedding.weight.detach(), init.reshape(4, 144))


def test_a_partial_model_holds_only_its_blocks_under_the_full_models_keys():
    cfg = small_config(T=5)
    full = NoPropDT(cfg)
    part = NoPropDT(cfg, owned_blocks=[2, 4])
    assert part.owned_blocks == [2, 4]
    keys = set(part.state_dict())
    assert keys <= set(full.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("blocks.")} == {"2", "4"}
    trainer = BlockTrainer(part, OptimConfig(batch_size=16))
    data = synthetic_data(32)
    trainer.step(4, data.x, data.y)
    with pytest.raises(RuntimeError, match="all 5 blocks"):
        part.predict(data.x)
    with pytest.raises(ValueError):
        NoPropDT(cfg, owned_blocks=[6])


def test_an_epoch_whose_last_batch_would_hold_one_example_trains():
    # BatchNorm cannot train on one example; a shard of 33 at batch 32 must not fail (it did on a Dirichlet shard)
    data = synthetic_data(33)
    model = NoPropDT(small_config())
    parts = BlockTrainer(model, OptimConfig(batch_size=32)).train_block_epoch(1, data)
    assert parts["loss"] > 0
    chain = BackpropChain(small_config())
    assert train_end_to_end_epoch(chain, torch.optim.AdamW(chain.parameters()), data, batch_size=32)["loss"] > 0
