"""How far honest client updates move the model's values: the measurement behind FederationConfig.max_value_ratio.

The server rejects a reply holding a value above ``max_value_ratio`` times the largest magnitude of the same
global tensor (at least 1). This script runs honest federated rounds on Fashion-MNIST the way the ClientApp
trains (NoPropDT holding only the owned blocks, BlockTrainer, train_owned_blocks, the real planner and
aggregate) and records, per reply and tensor, max|reply| / max(max|global|, 1). Round 1 starts from the
initialisation, where updates are largest. Variants: the product defaults, a higher learning rate with more
local epochs, and a Dirichlet(0.5) partition with learned embeddings.

    .venv/bin/python bench/update_range.py --benchmarks-md BENCHMARKS.md
    .venv/bin/python bench/update_range.py --tiny            # synthetic smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from noprop.data import load_dataset
from noprop.federation import FederationConfig
from noprop.model import NoPropDT
from noprop.partition import partition
from noprop.records import to_numpy_state, to_torch_state
from noprop.server.aggregate import Reply, aggregate, keys_for_blocks
from noprop.server.planner import NodeCapacity, plan_ownership
from noprop.trainer import BlockTrainer, OptimConfig, train_owned_blocks

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "defaults (lr 1e-3, 1 local epoch, iid, one-hot)": {},
    "lr 3e-3, 3 local epochs, iid, one-hot": {"lr": 3e-3, "local_epochs": 3},
    "lr 1e-3, 1 local epoch, dirichlet:0.5, learned:20": {"partition_type": "dirichlet:0.5", "embedding": "learned:20"},
}
SECTION = "### Range of honest updates (max_value_ratio)"


def ratios(reply: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per float tensor: largest magnitude in the reply over the global tensor's (counted as at least 1)."""
    out = {}
    for key, arr in reply.items():
        if np.issubdtype(arr.dtype, np.floating) and arr.size:
            out[key] = float(np.abs(arr).max()) / max(float(np.abs(reference[key]).max()), 1.0)
    return out


def run_variant(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    cfg = FederationConfig(T=args.T, channels=args.channels, **overrides).validate()
    train = load_dataset(args.dataset, "train", root=args.data_root)
    if args.subset and args.subset < len(train):
        train = train.subset(np.random.default_rng(0).permutation(len(train))[:args.subset])
    parts = partition(train.y.numpy(), args.clients, cfg.partition_type, cfg.seed)
    shards = {n + 1: train.subset(p) for n, p in enumerate(parts)}
    model_cfg = cfg.model_config(train.input_shape, train.num_classes)
    torch.manual_seed(cfg.seed)
    state = to_numpy_state(NoPropDT(model_cfg).state_dict())
    caps = [NodeCapacity(node_id=n, max_blocks=cfg.T, throughput=1000.0, num_examples=len(d))
            for n, d in shards.items()]
    rounds = []
    for rnd in range(1, args.rounds + 1):
        start = time.perf_counter()
        plan = plan_ownership(caps, cfg.T, rnd - 1, cfg.seed, cfg.policy, cfg.replicas)
        replies, worst = [], {"ratio": 0.0}
        all_ratios = []
        for node, blocks in sorted(plan.assignments.items()):
            keys = keys_for_blocks(state, blocks)
            torch.manual_seed(cfg.seed * 100_003 + rnd)
            model = NoPropDT(model_cfg, owned_blocks=list(blocks))
            model.load_state_dict(to_torch_state({k: state[k] for k in keys}), strict=True)
            trainer = BlockTrainer(model, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                      batch_size=cfg.batch_size))
            train_owned_blocks(trainer, list(blocks), shards[node], cfg.local_epochs)
            new = {k: v for k, v in to_numpy_state(model.state_dict()).items() if k in keys}
            r = ratios(new, state)
            all_ratios.extend(r.values())
            key = max(r, key=r.get)
            if r[key] > worst["ratio"]:
                worst = {"ratio": r[key], "tensor": key, "node": node}
            replies.append(Reply(node_id=node, arrays=new, num_examples=len(shards[node])))
        state = aggregate(state, plan, replies)
        rounds.append({"round": rnd, "max_ratio": worst["ratio"], "tensor": worst.get("tensor"),
                       "p99_ratio": float(np.percentile(all_ratios, 99)), "median_ratio": float(np.median(all_ratios)),
                       "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name}: round {rnd}/{args.rounds}: max ratio {worst['ratio']:.3f} ({worst.get('tensor')}), "
              f"p99 {rounds[-1]['p99_ratio']:.3f}, {rounds[-1]['seconds']:.0f}s", flush=True)
    return {"variant": name, "rounds": rounds, "max_ratio": max(r["max_ratio"] for r in rounds)}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [SECTION, "",
             f"`bench/update_range.py`: {args.clients} clients, {args.rounds} honest rounds from the initialisation, "
             f"{args.dataset} ({args.subset or 'all'} training examples), T={args.T}, channels {args.channels}, "
             "rotate policy. Ratio = max|reply value| / max(max|global value|, 1) per tensor, the quantity "
             "`max_value_ratio` bounds.", "",
             "| variant | round | max ratio | tensor at max | p99 over tensors | median |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rounds"]:
            lines.append(f"| {res['variant']} | {r['round']} | {r['max_ratio']:.3f} | `{r['tensor']}` | "
                         f"{r['p99_ratio']:.3f} | {r['median_ratio']:.3f} |")
    top = max(res["max_ratio"] for res in results)
    bound = FederationConfig.max_value_ratio
    lines += ["", f"Largest honest ratio: {top:.2f}. The default bound, max_value_ratio = {bound:g}, leaves a margin "
                  f"of {bound / top:.0f}x over it; a reply scaled or shifted far out of range is rejected "
                  "(tests/test_faults.py)."]
    return "\n".join(lines) + "\n"


def update_benchmarks(path: Path, section: str) -> None:
    """Replace (or append under ## Federated) this section of BENCHMARKS.md."""
    text = path.read_text()
    if SECTION in text:
        start = text.index(SECTION)
        nxt = [i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i >= 0]
        end = min(nxt) + 1 if nxt else len(text)
        text = text[:start] + section + ("\n" if end < len(text) else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--subset", type=int, default=12000, help="training examples shared among the clients (0 = all)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--channels", default="32,64,128")
    p.add_argument("--tiny", action="store_true", help="synthetic npz task, tiny network")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "update_range.json"))
    p.add_argument("--benchmarks-md", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        import tempfile

        from procs import write_synthetic_npz
        args.dataset = f"npz:{write_synthetic_npz(Path(tempfile.mkdtemp()) / 'task.npz')}"
        args.subset, args.T, args.channels, args.rounds = 0, 3, "8,16,16", 2
    results = [run_variant(name, overrides, args) for name, overrides in VARIANTS.items()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    section = markdown(results, args)
    print(section)
    if args.benchmarks_md:
        update_benchmarks(Path(args.benchmarks_md), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
