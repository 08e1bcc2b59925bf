"""Local training: NoProp-DT blocks one at a time; backprop, NoProp-CT/FM and the adjoint ODE end to end.

The same code trains a whole model on one machine and the owned blocks on a federated client.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from noprop.data import LabelledData


@dataclass
class OptimConfig:
    """AdamW settings of the paper's Table 3."""

    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 128


def param_groups(params: Iterable[nn.Parameter], lr: float) -> list[dict]:
    """Optimizer groups: parameters that carry an lr_scale attribute (unit-scaled prototype rows,
    noprop.model.scale_prototypes) train at lr x lr_scale, the rest at lr."""
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]


def adamw(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(params, cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)


class BlockTrainer:
    """One AdamW per block and one for the shared head and embedding.

    Separate optimizers are what keep an idle block bit-identical: a single optimizer would still apply
    weight decay and stale Adam moments to every block on every step.
    """

    def __init__(self, model, optim: OptimConfig, blocks: Iterable[int] | None = None):
        self.model = model
        self.optim = optim
        owned = model.owned_blocks if blocks is None else blocks
        self.block_optimizers = {t: adamw(model.block(t).parameters(), optim) for t in owned}
        self.shared_optimizer = adamw(model.shared_parameters(), optim)

    def step(self, t: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
             log_prior: torch.Tensor | None = None) -> dict[str, float]:
        """One gradient step of block t (plus head and W) on one minibatch."""
        block_opt = self.block_optimizers[t]
        self.model.block(t).train()
        self.model.head.train()
        loss, parts = self.model.block_loss(t, x, y, generator, log_prior)
        block_opt.zero_grad(set_to_none=True)
        self.shared_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        block_opt.step()
        self.shared_optimizer.step()
        return parts

    def train_block_epoch(self, t: int, data: LabelledData, generator: torch.Generator | None = None,
                          on_batch: Callable[[dict[str, float]], None] | None = None,
                          log_prior: torch.Tensor | None = None) -> dict[str, float]:
        """One pass of block t over data; returns the batch-averaged loss parts."""
        device = next(self.model.parameters()).device
        prior = None if log_prior is None else log_prior.to(device)
        totals: dict[str, float] = {}
        n = 0
        # a last minibatch of one example would make BatchNorm raise: drop it (it is one example of the epoch)
        drop_last = len(data) % self.optim.batch_size == 1
        for x, y in data.batches(self.optim.batch_size, shuffle=True, generator=generator, drop_last=drop_last):
            parts = self.step(t, x.to(device), y.to(device), generator=None, log_prior=prior)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
            if on_batch is not None:
                on_batch(parts)
        return {k: v / max(n, 1) for k, v in totals.items()}


def train_owned_blocks(trainer: BlockTrainer, blocks: Iterable[int], data: LabelledData | Mapping[int, LabelledData],
                       epochs: int, generator: torch.Generator | None = None,
                       progress: Callable[[int, int], Callable[[dict[str, float]], None] | None] | None = None,
                       log_prior: torch.Tensor | None = None) -> dict[int, dict[str, float]]:
    """Algorithm 1 restricted to the given blocks: for each epoch, for each block, one pass over its data (the
    same data for every block, or a block -> data mapping: split_among_blocks).

    progress(epoch, t) may return a per-batch callback (a progress bar's update). log_prior: see
    NoPropDT.block_loss. Returns each block's loss parts averaged over its last epoch.
    """
    result: dict[int, dict[str, float]] = {}
    for epoch in range(epochs):
        for t in blocks:
            block_data = data[t] if isinstance(data, Mapping) else data
            result[t] = trainer.train_block_epoch(t, block_data, generator,
                                                  progress(epoch, t) if progress else None, log_prior)
    return result


def split_among_blocks(data: LabelledData, blocks: Sequence[int], seed: int) -> dict[int, LabelledData]:
    """A disjoint, seeded, class-stratified share of data for each block: a node that owns k blocks then spends
    one block-epoch a round whatever k is, and each block still sees every local class."""
    g = np.random.default_rng(seed)
    y = data.y.numpy()
    shares: list[list[np.ndarray]] = [[] for _ in blocks]
    offset = 0
    for c in np.unique(y):
        idx = g.permutation(np.flatnonzero(y == c))
        for i, part in enumerate(np.array_split(idx, len(blocks))):
            shares[(i + offset) % len(blocks)].append(part)
        offset += len(idx) % len(blocks)  # the larger leftovers rotate, so shares differ in size by at most one
    return {t: data.subset(np.sort(np.concatenate(parts))) for t, parts in zip(blocks, shares)}


def node_seed(seed: int, rnd: int, node: int | str) -> int:
    """A training seed of its own for every node and round: co-owners of a block (or FedAvg clients) must not draw
    the same noise and batch order, and a node must not repeat its draws from round to round. node is the node's
    stable identity (its name; 0 for the server's own draws), never Flower's node id, which changes between runs."""
    key = node if isinstance(node, int) else zlib.crc32(node.encode())
    return (seed * 1_000_003 + rnd * 10_007 + key) % 2**31


def epochs_for_min_steps(num_examples: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Local epochs raised until a block gets at least min_steps optimizer steps: a node with a few hundred
    examples would otherwise give its blocks a handful of steps a round (issue 10: 4 per block per round)."""
    batches = max(1, num_examples // batch_size + (num_examples % batch_size > 1))
    return max(epochs, -(-min_steps // batches)) if min_steps > 0 else epochs


def label_log_prior(y: torch.Tensor, num_classes: int, floor: float = 1e-4) -> torch.Tensor:
    """log of the labels' frequencies (each at least floor, so an absent class stays finite)."""
    counts = torch.bincount(y.long().flatten(), minlength=num_classes).double()
    return (counts / counts.sum()).clamp_min(floor).log().float()


def fit_head(model, steps: int, batch_size: int = 256, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Train the output head alone, class-balanced, on z_T ~ q(z_T | y) with y uniform: the head's CE needs
    only labels and W, never an image, so the server can give it every step it needs whatever the nodes'
    label mix. W is held fixed (the blocks were trained against it). Returns the CE before and after."""
    head, W = model.head, model.embedding.weight.detach()
    generator = torch.Generator().manual_seed(seed)
    m = W.shape[0]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()

    def ce() -> torch.Tensor:
        y = torch.randint(0, m, (batch_size,), generator=generator).to(W.device)
        z = model.schedule.sample_marginal(W[y], model.T, generator=generator)
        return torch.nn.functional.cross_entropy(head(z, W), y)

    with torch.no_grad():
        before = ce().item()
    for _ in range(steps):
        loss = ce()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        after = ce().item()
    return {"ce_before": before, "ce_after": after}


def train_end_to_end_epoch(model, optimizer: torch.optim.Optimizer, data: LabelledData, batch_size: int,
                           generator: torch.Generator | None = None,
                           on_batch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """One epoch of a model trained with one optimizer (backprop, NoProp-CT/FM, adjoint); mean loss parts.

    model.loss(x, y) returns the loss or (loss, parts dict). The model config's grad_clip (NoProp-CT), when
    positive, caps each step's gradient norm (torch's clip_grad_norm_); parts then hold the norm before the cap.
    """
    device = next(model.parameters()).device
    max_grad_norm = float(getattr(getattr(model, "cfg", None), "grad_clip", 0.0) or 0.0)
    model.train()
    totals: dict[str, float] = {}
    n = 0
    for x, y in data.batches(batch_size, shuffle=True, generator=generator, drop_last=len(data) % batch_size == 1):
        out = model.loss(x.to(device), y.to(device))
        loss, parts = out if isinstance(out, tuple) else (out, {"loss": out.item()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            parts = {**parts, "grad_norm": float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))}
        optimizer.step()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        if on_batch is not None:
            on_batch(parts)
    return {k: v / max(n, 1) for k, v in totals.items()}


@torch.no_grad()
def evaluate_accuracy(model, data: LabelledData, mode: str = "deterministic", batch_size: int = 500,
                      seed: int = 0) -> float:
    """Accuracy of model.predict on data; predict never sees the labels."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for x, y in data.batches(batch_size, shuffle=False):
        pred = model.predict(x.to(device), mode=mode, generator=generator).cpu()
        correct += int((pred == y).sum())
    return correct / max(len(data), 1)


def accuracy_report(model, data: LabelledData, mode: str = "deterministic", seed: int = 0) -> dict:
    """A one-network method's evaluation in a federation: the accuracy of its own predict."""
    return {"accuracy": evaluate_accuracy(model, data, mode, seed=seed)}
