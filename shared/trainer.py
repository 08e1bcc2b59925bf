"""Local training: NoProp-DT blocks one at a time; backprop, NoProp-CT/FM and the adjoint ODE end to end.

The same code trains a whole model on one machine and the owned blocks on a federated client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def adamw(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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

    def step(self, t: int, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, float]:
        """One gradient step of block t (plus head and W) on one minibatch."""
        block_opt = self.block_optimizers[t]
        self.model.block(t).train()
        self.model.head.train()
        loss, parts = self.model.block_loss(t, x, y, generator)
        block_opt.zero_grad(set_to_none=True)
        self.shared_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        block_opt.step()
        self.shared_optimizer.step()
        return parts

    def train_block_epoch(self, t: int, data: LabelledData, generator: torch.Generator | None = None,
                          on_batch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """One pass of block t over data; returns the batch-averaged loss parts."""
        device = next(self.model.parameters()).device
        totals: dict[str, float] = {}
        n = 0
        # a last minibatch of one example would make BatchNorm raise: drop it (it is one example of the epoch)
        drop_last = len(data) % self.optim.batch_size == 1
        for x, y in data.batches(self.optim.batch_size, shuffle=True, generator=generator, drop_last=drop_last):
            parts = self.step(t, x.to(device), y.to(device), generator=None)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
            if on_batch is not None:
                on_batch(parts)
        return {k: v / max(n, 1) for k, v in totals.items()}


def train_owned_blocks(trainer: BlockTrainer, blocks: Iterable[int], data: LabelledData, epochs: int,
                       generator: torch.Generator | None = None,
                       progress: Callable[[int, int], Callable[[dict[str, float]], None] | None] | None = None
                       ) -> dict[int, dict[str, float]]:
    """Algorithm 1 restricted to the given blocks: for each epoch, for each block, one pass over data.

    progress(epoch, t) may return a per-batch callback (a progress bar's update). Returns each block's
    loss parts averaged over its last epoch.
    """
    result: dict[int, dict[str, float]] = {}
    for epoch in range(epochs):
        for t in blocks:
            result[t] = trainer.train_block_epoch(t, data, generator, progress(epoch, t) if progress else None)
    return result


def train_end_to_end_epoch(model, optimizer: torch.optim.Optimizer, data: LabelledData, batch_size: int,
                           generator: torch.Generator | None = None,
                           on_batch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """One epoch of a model trained with one optimizer (backprop, NoProp-CT/FM, adjoint); mean loss parts.

    model.loss(x, y) returns the loss or (loss, parts dict).
    """
    device = next(model.parameters()).device
    model.train()
    totals: dict[str, float] = {}
    n = 0
    for x, y in data.batches(batch_size, shuffle=True, generator=generator, drop_last=len(data) % batch_size == 1):
        out = model.loss(x.to(device), y.to(device))
        loss, parts = out if isinstance(out, tuple) else (out, {"loss": out.item()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
        if on_batch is not None:
            on_batch(parts)
    return {k: v / max(n, 1) for k, v in totals.items()}


def train_backprop_epoch(model, optimizer: torch.optim.Optimizer, data: LabelledData, batch_size: int,
                         generator: torch.Generator | None = None,
                         on_batch: Callable[[dict[str, float]], None] | None = None) -> float:
    """One end-to-end epoch of the backprop baseline; returns the mean loss."""
    return train_end_to_end_epoch(model, optimizer, data, batch_size, generator, on_batch).get("loss", 0.0)


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
