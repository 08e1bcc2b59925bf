"""What the assembled NoProp-DT chain knows, read off at each of its stages (issue 10's instruments).

Every readout is label-free (predict's paths, never y): along the inference chain, each block's own guess
argmax u_hat_t, the nearest class embedding of z_T and the head; beside it, the blocks' ensemble (each block on x
alone). Comparing them separates a weak block from a head that misreads a good z_T, and the chain from the
ensemble; per-class accuracy (of the model's own readout) shows which labels a skewed federation lost. The labels
are used only afterwards, to score the readouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from noprop.data import LabelledData
from noprop.model import class_posterior_logits
from noprop.schedule import CosineSchedule


@dataclass
class ChainReadouts:
    """Predicted classes [N] of one batch at every stage of the chain."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # t -> argmax u_hat_t
    nearest: torch.Tensor | None = None  # argmin_y ||z_T - u_y||
    head: torch.Tensor | None = None  # argmax of the output head on z_T
    ensemble: torch.Tensor | None = None  # argmax of the blocks' ensemble (NoPropDT.ensemble_log_probs)

    def predicted(self, readout: str) -> torch.Tensor | None:
        """What the model's predict gives under its readout."""
        return self.ensemble if readout == "ensemble" else self.head


@torch.no_grad()
def chain_readouts(model, x: torch.Tensor, noise: torch.Tensor | None = None) -> ChainReadouts:
    """Run the chain once on x (deterministic unless noise is given) and read every stage. Takes no labels."""
    was_training = model.training
    model.eval()
    try:
        W = model.embedding.weight
        out = ChainReadouts()

        def read_block(t: int, probs: torch.Tensor) -> None:
            out.blocks[t] = probs.argmax(dim=1).cpu()  # the block's own guess (u_hat_t = probs W)

        z = model.chain(x, noise, on_block=read_block)
        out.nearest = torch.cdist(z, W).argmin(dim=1).cpu()
        out.head = model.head(z, W).argmax(dim=1).cpu()
        out.ensemble = model.ensemble_log_probs(x).argmax(dim=1).cpu()
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def chain_diagnostics(model, data: LabelledData, mode: str = "deterministic", batch_size: int = 500,
                      seed: int = 0) -> dict:
    """Accuracy of every readout over data, and the head's accuracy per class (by class name).

    Keys: accuracy (what predict gives: the config's readout), chain_accuracy (the head on z_T),
    ensemble_accuracy, nearest_accuracy, block_accuracy {t: acc}, class_accuracy {class name: acc} (of predict).
    """
    readout = getattr(model.cfg, "readout", "chain")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    m, T = len(data.classes), model.T
    correct_blocks = torch.zeros(T + 1)
    correct_nearest = correct_head = correct_ensemble = correct = 0
    per_class_hit, per_class_n = torch.zeros(m), torch.zeros(m)
    for x, y in data.batches(batch_size, shuffle=False):
        noise = None
        if mode == "stochastic":
            noise = torch.randn(T + 1, x.shape[0], model.embedding.weight.shape[1], generator=generator)
            noise = noise.to(device)
        r = chain_readouts(model, x.to(device), noise)
        for t, pred in r.blocks.items():
            correct_blocks[t] += int((pred == y).sum())
        correct_nearest += int((r.nearest == y).sum())
        correct_head += int((r.head == y).sum())
        correct_ensemble += int((r.ensemble == y).sum())
        hit = (r.predicted(readout) == y).float()
        correct += int(hit.sum())
        per_class_hit.index_add_(0, y, hit)
        per_class_n.index_add_(0, y, torch.ones_like(hit))
    n = max(len(data), 1)
    return {
        "accuracy": correct / n,
        "chain_accuracy": correct_head / n,
        "ensemble_accuracy": correct_ensemble / n,
        "nearest_accuracy": correct_nearest / n,
        "block_accuracy": {str(t): float(correct_blocks[t]) / n for t in range(1, T + 1)},
        "class_accuracy": {str(name): (float(per_class_hit[c] / per_class_n[c]) if per_class_n[c] else None)
                           for c, name in enumerate(data.classes)},
    }


@torch.no_grad()
def label_from_z_accuracy(embedding: torch.Tensor, schedule: CosineSchedule, samples: int = 2000,
                          generator: torch.Generator | None = None) -> list[float]:
    """For each block t = 1..T: how often the exact posterior q(y | z_{t-1}) (uniform prior) names y when its input
    z_{t-1} ~ q(z_{t-1} | y). Near 1, that block can learn to copy z and ignore x; one-hot rows reach 0.9 only at
    the last blocks (issue 12's measurement of prototype rows)."""
    W = embedding.detach().float()
    out = []
    for t in range(1, schedule.T + 1):
        y = torch.randint(0, W.shape[0], (samples,), generator=generator)
        z = schedule.sample_marginal(W[y], t - 1, generator=generator)
        out.append(float((class_posterior_logits(z, W, schedule.alpha_bar_at(t - 1)).argmax(1) == y).float().mean()))
    return out
