"""Flags and config of a federated run: one flag per FederationConfig field, its TOML file, and absolute paths."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from noprop.federation import FederationConfig  # torch-free: its method checks build config dataclasses only
from noprop.ops.cli import LaunchError
from noprop.settings import Flag, SettingsError, add_flags, given_flags, layered

FLAG_DEST_PREFIX = "cfg_"  # args.cfg_<field>: the run settings apart from a launcher's own flags

_HELP = {
    "method": "dt (each client trains the NoProp blocks it owns) or a one-network method trained whole by every "
              "client and averaged (FedAvg): ct, fm, adjoint, backprop, cnn (the plain CNN peer)",
    "num_rounds": "federated rounds",
    "T": "number of NoProp blocks (diffusion steps)",
    "policy": "block ownership policy: rotate (a block moves to another owner each round) or replicate",
    "replicas": "owners per block under the replicate policy",
    "min_nodes": "clients that must connect before the first round",
    "local_epochs": "passes over its local data a client makes per round",
    "batch_size": "training batch size on the clients",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "embedding": "class embedding: one-hot or learned:D",
    "head": "output head: softmax or radial",
    "eta": "weight of the denoising loss (the spec's eta; 0 = the method's default: dt 0.1, ct 1.0)",
    "steps": "ct, fm, adjoint: integration steps from t=0 to 1 at inference (0 = the method's default)",
    "solver": "fm: euler or heun; adjoint: euler, midpoint or rk4 (empty = euler)",
    "fm_sigma": "fm: width of the Gaussian probability path",
    "clip": "the schedule's alpha-bar clip",
    "channels": "conv widths of a block, three comma-separated numbers",
    "hidden": "hidden width of a block",
    "dropout": "dropout in a block",
    "norm": "dt: normalisation in a block: batch (Figure 6) or layer (no running statistics to skew)",
    "z_skip": "dt: each block adds the closed-form class posterior given z_{t-1} to its logits and learns only what "
              "x adds (not Figure 6; --no-z-skip is the paper's block)",
    "head_steps": "dt: steps the server trains the output head each round, class-balanced on q(z_T | y), "
                  "no images (0 = off: the averaged head of the clients)",
    "logit_adjust": "dt: clients add their local label prior to the logits while training (balanced softmax), so a "
                    "block does not learn its last owner's label mix",
    "coverage_step": "dt: a block moves from its weights towards its owners' mean only by the share of the classes "
                     "those owners hold together (from discovery), so an owner with 2 of 10 classes cannot overwrite "
                     "what the block knew of the other 8",
    "label_aware": "dt: the plan picks a block's owners to hold as many classes together as they can, and hands a "
                   "block on to owners whose classes differ, from the class sets clients report in discovery",
    "plan_by_speed": "dt: a client's share of the blocks follows the throughput it measured at discovery as well as "
                     "its data (noprop-sim's default is off: virtual clients share one machine, so their timings "
                     "measure contention and would change the plan from run to run)",
    "split_local_data": "dt: each of a client's k blocks trains on its own 1/k of the local data, so a round costs "
                        "one block-epoch whatever k is (with replicate: more owners per block at the same compute)",
    "min_local_steps": "a client raises its local epochs until its local data gives at least this many optimizer "
                       "steps a round, per block it trains (with --split-local-data: over its blocks' shares "
                       "together); the same floor applies to FedAvg clients (0 = off)",
    "dataset": "dataset the server evaluates on (its test split): fashion-mnist, mnist, cifar10, cifar100, "
               "imagefolder:DIR, npz:FILE",
    "data_root": "folder holding the datasets (default: $NOPROP_DATA or ./data)",
    "client_data": "dataset of clients that name none (default: --dataset)",
    "partition_type": "default partitioning of clients that name none: iid, dirichlet:ALPHA or classes:K (K classes "
                      "per client)",
    "eval_limit": "test examples evaluated each round (0 = all)",
    "final_eval_limit": "test examples evaluated after the last round (0 = all)",
    "eval_mode": "inference mode for evaluation: deterministic or stochastic",
    "eval_in_background": "dt: evaluate and checkpoint round r while round r+1 trains, off the rounds' critical path "
                          "(a crash then can lose round r too: --resume continues from the checkpoint before it)",
    "client_eval": "also ask clients that can hold the chain to evaluate it on their data",
    "out": "output folder: metrics.jsonl, checkpoint.pt, accuracy.png, ownership.png, DONE.json",
    "resume": "continue from OUT/checkpoint.pt",
    "seed": "random seed",
    "round_timeout": "seconds a round waits for replies; later replies are dropped and the node planned out",
    "join_timeout": "seconds the first round waits for --min-clients clients",
    "reply_poll_s": "seconds between the server's looks for replies (Flower's own Grid waits 3)",
    "client_threads": "torch threads per client process (0 = torch's default)",
    "aggregation": "how the shared embedding and head are combined: mean (weighted by examples), or median / "
                   "trimmed-mean (coordinate-wise, robust to a few poisoned nodes; need 3+ replies to differ)",
    "trim_fraction": "trimmed-mean: share of the replies cut at each end of every coordinate",
    "max_value_ratio": "reject a reply holding a value above this many times the largest magnitude of the same "
                       "global tensor (at least 1)",
}
# friendly names kept next to the generated ones (--rounds is --num-rounds, --min-clients is --min-nodes)
_ALIASES = {"num_rounds": ("--rounds",), "min_nodes": ("--min-clients",)}
FEDERATION_FLAGS = {name: Flag(text, aliases=_ALIASES.get(name, ()), list_as_text=name == "channels")
                    for name, text in _HELP.items()}
PATH_FIELDS = ("out", "data_root")  # resolved to absolute paths: Flower's processes run elsewhere
DATASET_FIELDS = ("dataset", "client_data")  # npz:FILE / imagefolder:DIR specs get an absolute path


def add_federation_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> dict[str, str]:
    """One flag per FederationConfig field (booleans --x/--no-x), the friendly aliases and ``--config TOML``, in
    one group of the help. Returns {field name: primary flag}."""
    group = parser.add_argument_group("run settings (defaults from noprop.federation.FederationConfig)")
    return add_flags(group, FederationConfig, FEDERATION_FLAGS, dest_prefix=FLAG_DEST_PREFIX, show_defaults=True,
                     skip=skip, config_help="TOML file of run settings (keys = these flags' names, dashes or "
                                            "underscores); flags win over it")


def resolve_dataset_spec(spec: str, base: Path | None = None) -> str:
    """``npz:rel/file.npz`` -> ``npz:/abs/rel/file.npz`` (same for imagefolder:), and a bare path that exists
    (``rel/mine.npz``, ``./images``: one with a / or a dot, which no built-in dataset name has) -> its absolute
    path, so that the Flower processes, which run elsewhere, find it; other specs unchanged."""

    def absolute(text: str) -> str:  # joining an absolute path keeps it as it is
        return str(((base or Path.cwd()) / Path(text).expanduser()).resolve())

    for prefix in ("npz:", "imagefolder:"):
        if spec.startswith(prefix) and spec[len(prefix):].strip():
            return prefix + absolute(spec[len(prefix):].strip())
    bare = spec.strip()
    if ("/" in bare or "." in bare) and Path(bare).expanduser().exists():
        return absolute(bare)
    return spec


def federation_config_from_args(args: argparse.Namespace, extra: dict[str, object] | None = None,
                                resolve_paths: bool = True) -> tuple[FederationConfig, dict[str, object]]:
    """Defaults < --config TOML < ``extra`` < flags. Returns the validated config and the overridden fields.
    Relative paths (out, data root, npz:/imagefolder: specs) become absolute. Raises LaunchError."""
    try:
        values = layered(FederationConfig, getattr(args, "config", None), extra or {},
                         given_flags(args, FederationConfig, FLAG_DEST_PREFIX), table="federation",
                         flags=FEDERATION_FLAGS)
    except SettingsError as exc:
        raise LaunchError(str(exc)) from None
    if resolve_paths:
        for name in PATH_FIELDS:
            if values.get(name):
                values[name] = str(Path(str(values[name])).expanduser().resolve())
        if not values.get("out"):
            values["out"] = str(Path(FederationConfig.out).resolve())
        for name in DATASET_FIELDS:
            if values.get(name):
                values[name] = resolve_dataset_spec(str(values[name]))
    try:
        cfg = FederationConfig(**values).validate()
    except (ValueError, TypeError) as exc:
        raise LaunchError(str(exc)) from None
    return cfg, values
