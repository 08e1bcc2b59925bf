"""Why prototype embeddings failed (issue 12): the measurements behind the fix, on real data.

1. The rows against the noise: for each block's input z_{t-1} ~ q(z_{t-1} | y), how often the exact posterior
   given z alone names y (noprop.diagnostics.label_from_z_accuracy), for one-hot, learned (its start) and
   prototype rows, raw and scaled to unit mean norm. Where it is near 1, a block can copy z and ignore x.
2. With --checkpoint (a NoProp-DT model): each block's own guess along the deterministic and the stochastic
   chain (noprop.diagnostics.chain_readouts), and the size of the deterministic chain's z_t against the training
   marginal's, which the blocks were trained on.

    .venv/bin/python bench/prototype_causes.py --subset 6000 \
        --checkpoint bench/results/paper_table/subset6000-epochs3-issue12/fashion-mnist/dt-prototype/checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def rows_against_noise(args: argparse.Namespace) -> str:
    from noprop.data import load_train_test
    from noprop.diagnostics import label_from_z_accuracy
    from noprop.model import ClassEmbedding, prototype_rows, scale_prototypes
    from noprop.schedule import CosineSchedule

    train, _ = load_train_test(args.dataset, root=args.data_root, subset=args.subset, seed=0)
    m = train.num_classes
    raw = prototype_rows(train.x, train.y, m)
    torch.manual_seed(0)
    rows = {"one-hot": torch.eye(m), "learned:20 (start)": ClassEmbedding("learned", m, 20).weight.detach(),
            "prototype, image scale": raw, "prototype, unit scale": scale_prototypes(raw, "unit")[0]}
    schedule = CosineSchedule(T=args.T)
    head = " | ".join(str(t) for t in range(1, schedule.T + 1))
    lines = [f"Label named by z_(t-1) alone, block t = 1..{schedule.T} ({args.dataset}, {len(train)} images):", "",
             f"| rows | d | row norm | nearest / mean distance | {head} |",
             "|---|---|---|---|" + "---|" * schedule.T]
    for name, W in rows.items():
        dist = torch.cdist(W, W)[~torch.eye(m, dtype=torch.bool)]
        acc = label_from_z_accuracy(W, schedule, generator=torch.Generator().manual_seed(0))
        lines.append(f"| {name} | {W.shape[1]} | {W.norm(dim=1).mean():.2f} | {dist.min():.2f} / {dist.mean():.2f} | "
                     + " | ".join(f"{a:.2f}" for a in acc) + " |")
    lines.append(f"\n(noise: unit variance per dimension, norm sqrt(d); chance {1 / m:.2f})")
    return "\n".join(lines)


@torch.no_grad()
def chain_along_blocks(args: argparse.Namespace) -> str:
    from noprop.checkpoint import load_checkpoint
    from noprop.data import load_train_test
    from noprop.diagnostics import chain_readouts

    model = load_checkpoint(args.checkpoint).model().eval()
    _, test = load_train_test(args.dataset, root=args.data_root, subset=args.subset, seed=0)
    x, y = test.x[:args.images], test.y[:args.images]
    W = model.embedding.weight
    d = W.shape[1]
    noise = torch.randn(model.T + 1, len(x), d, generator=torch.Generator().manual_seed(0))
    lines = [f"Along the chain of {args.checkpoint} ({model.cfg.embedding}, {len(x)} test images): % right", "",
             "| chain | " + " | ".join(f"block {t}" for t in range(1, model.T + 1)) + " | nearest row of z_T | head |",
             "|---|" + "---|" * (model.T + 2)]
    for name, eps in (("deterministic", None), ("stochastic", noise)):
        r = chain_readouts(model, x, eps)
        cells = [(r.blocks[t] == y).float().mean() for t in range(1, model.T + 1)] + \
            [(r.nearest == y).float().mean(), (r.head == y).float().mean()]
        lines.append(f"| {name} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |")
    sizes = []
    z = torch.zeros(len(x), d)
    for t in range(1, model.T + 1):  # the deterministic chain, step by step, to read each z_t
        z = model.schedule.step(t, torch.softmax(model.block_logits(t, x, z), dim=1) @ W, z)
        ab = model.schedule.alpha_bar_at(t)
        trained = math.sqrt(ab * float(W.pow(2).sum(1).mean()) + (1 - ab) * d)
        sizes.append(f"{z.norm(dim=1).mean():.2f} / {trained:.2f}")
    lines += ["", "||z_t|| of the deterministic chain / of q(z_t | y), t = 1..T: " + ", ".join(sizes)]
    lines += ["", rows_moved(args, W)]
    return "\n".join(lines)


def rows_moved(args: argparse.Namespace, W: torch.Tensor) -> str:
    """How far training moved the checkpoint's prototype rows from the rows it started from (same data, seed 0)."""
    from noprop.checkpoint import load_checkpoint
    from noprop.data import load_train_test
    from noprop.model import prototype_rows, scale_prototypes

    train_cfg = load_checkpoint(args.checkpoint).extra.get("train_config", {})
    train, _ = load_train_test(args.dataset, root=args.data_root, subset=args.subset, seed=train_cfg.get("seed", 0))
    start, factor = scale_prototypes(prototype_rows(train.x, train.y, train.num_classes, seed=train_cfg.get("seed", 0)),
                                     train_cfg.get("prototype_scale") or "unit")
    off = ~torch.eye(len(W), dtype=torch.bool)
    cos = torch.nn.functional.cosine_similarity(W, start, dim=1)
    return (f"Rows against their start (lr factor {factor:.3f}): moved {(W - start).norm() / start.norm():.1%}, "
            f"mean norm {W.norm(dim=1).mean():.2f} (start {start.norm(dim=1).mean():.2f}), cosine with the start "
            f"{cos.min():.2f}-{cos.max():.2f}, nearest pair {torch.cdist(W, W)[off].min():.3f} apart "
            f"(start {torch.cdist(start, start)[off].min():.3f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--subset", type=int, default=6000)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--checkpoint", help="a NoProp-DT checkpoint to read along its chain")
    p.add_argument("--images", type=int, default=1000, help="test images read along the chain")
    args = p.parse_args()
    print(rows_against_noise(args))
    if args.checkpoint:
        print()
        print(chain_along_blocks(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
