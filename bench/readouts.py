"""Every readout of one checkpoint's NoProp-DT weights on a test set, side by side (issue 21's "ensemble readout").

No training: the same weights read by the chain (the head on z_T), by the ensemble at z = 0 (`--readout
ensemble`), by the ensemble of the blocks' logits along the chain's z, by the first k blocks' ensemble, by an
ensemble weighted by 1 - alpha_bar_{t-1} and by the mixture (the mean of the blocks' p_t rather than of their
log p_t, which one block's near-zero p_t cannot veto), with the worst class of the two ensembles. Run it on the
checkpoints bench/label_skew.py leaves:

    .venv/bin/python bench/readouts.py bench/results/label_skew/runs/10c-6r-*-dt-chain-s0/checkpoint.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def worst_class(scores: torch.Tensor, y: torch.Tensor) -> float:
    """The lowest per-class accuracy, in percent: where a readout drops whole classes."""
    hit = scores.argmax(1) == y
    return round(min(100 * hit[y == k].float().mean().item() for k in y.unique()), 1)


def readouts(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    acc = lambda logits: round(100 * (logits.argmax(1) == y).float().mean().item(), 1)  # noqa: E731
    W = model.embedding.weight
    z = torch.zeros(x.shape[0], W.shape[1])
    along_chain = []
    for t in range(1, model.T + 1):
        raw = model.block(t)(x, z)
        along_chain.append(raw)
        z = model.schedule.step(t, F.softmax(raw + model.z_posterior_logits(t, z), 1) @ W, z, None)
    at_zero = torch.stack([F.log_softmax(model.block(t)(x, torch.zeros_like(z)), 1) for t in range(1, model.T + 1)])
    noise = torch.tensor([1 - model.schedule.alpha_bar_at(t - 1) for t in range(1, model.T + 1)]).float()
    out = {"chain": acc(model.head(z, W)), "ensemble": acc(at_zero.mean(0)),
           "ensemble along the chain": acc(torch.stack(along_chain).sum(0)),
           "weighted by 1 - alpha_bar": acc((noise[:, None, None] * at_zero).sum(0)),
           "mixture (mean of p_t)": acc(at_zero.exp().mean(0)),
           "worst class, ensemble": worst_class(at_zero.mean(0), y),
           "worst class, mixture": worst_class(at_zero.exp().mean(0), y)}
    out |= {f"first {k} blocks": acc(at_zero[:k].mean(0)) for k in range(1, model.T)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    args = p.parse_args()
    from noprop.checkpoint import load_checkpoint
    from noprop.data import load_train_test

    torch.set_num_threads(2)
    _, test = load_train_test(args.dataset, root=args.data_root)
    for path in args.checkpoints:
        model = load_checkpoint(path).model()
        if not hasattr(model, "ensemble_log_probs"):
            print(f"{path}: not a NoProp-DT checkpoint", file=sys.stderr)
            return 2
        with torch.no_grad():
            print(Path(path).parent.name, readouts(model, test.x, test.y))
    return 0


if __name__ == "__main__":
    sys.exit(main())
