"""Flags and config of a federated run: one flag per FederationConfig field, its TOML file, and absolute paths."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from noprop.federation import AGGREGATIONS, POLICIES, FederationConfig  # torch-free: config dataclasses only
from noprop.methods import METHODS
from noprop.model_configs import ADJOINT_SOLVERS, FM_SOLVERS, HEAD_KINDS, NORM_KINDS, READOUTS
from noprop.ops.cli import LaunchError
from noprop.settings import Flag, SettingsError, add_flags, flag_name, given_flags, layered

FLAG_DEST_PREFIX = "cfg_"  # args.cfg_<field>: the run settings apart from a launcher's own flags

PARTITIONS = "iid|dirichlet:ALPHA|classes:K"
SOLVERS = tuple(dict.fromkeys((*FM_SOLVERS, *ADJOINT_SOLVERS)))

# Which methods a flag applies to is said first ("dt:", "dt, backprop:", ...), from the code that reads it: T and
# norm shape the blocks of NoPropConfig (dt and the backprop chain); clip and eta weigh NoProp-DT's per-block loss
# (the backprop chain trains on cross entropy alone; eta weighs NoProp-CT's loss too); policy, replicas and the
# planner's options reach BlockOwnershipStrategy only (dt); steps, solver and fm_sigma the continuous configs. A
# flag without a mark applies to every method. APPLIES_TO lists the method-specific ones for the warning below.
FEDERATION_FLAGS: dict[str, Flag] = {
    "method": Flag("dt: each client trains the NoProp blocks it owns; the others are one network every client "
                   "trains whole and the server averages (FedAvg); cnn is the plain CNN peer",
                   listed=tuple(METHODS)),
    "num_rounds": Flag("federated rounds", aliases=("--rounds", "--num-server-rounds")),
    "fraction_train": Flag("share of the connected clients that train each round (client sampling): a seeded "
                           "rotation, so each client trains once every ceil(1/F) rounds and the same seed picks "
                           "the same clients; dt adds the next clients until the sample can hold every block"),
    "min_train_nodes": Flag("fewest clients that train a round, whatever --fraction-train gives"),
    "T": Flag("dt, backprop: number of NoProp blocks (diffusion steps)"),
    "policy": Flag("dt: block ownership policy: rotate (a block moves to another owner each round), replicate "
                   "(--replicas owners per block) or stay (a block keeps its owners from round to round while the "
                   "nodes are the same)", listed=POLICIES),
    "replicas": Flag("dt: owners per block under --policy replicate"),
    "min_nodes": Flag("clients that must connect before the first round", aliases=("--min-clients",)),
    "local_epochs": Flag("passes over its local data a client makes per round"),
    "batch_size": Flag("training batch size on the clients"),
    "lr": Flag("learning rate of the method's optimizer (Adam for ct and fm, AdamW for the others)"),
    "weight_decay": Flag("weight decay of the method's optimizer (Adam for ct and fm, AdamW for the others)"),
    "embedding": Flag("class embedding: one-hot or learned:D (cnn: one-hot only)", metavar="one-hot|learned:D"),
    "head": Flag("output head (cnn: softmax only)", listed=HEAD_KINDS),
    "eta": Flag("dt, ct: weight of the denoising loss (the spec's eta)", default="the method's own: dt 0.1, ct 1.0"),
    "steps": Flag("ct, fm, adjoint: integration steps from t=0 to 1 at inference", default="the method's own, 10"),
    "solver": Flag("fm: euler or heun; adjoint: euler, midpoint or rk4", listed=SOLVERS, default="euler"),
    "fm_sigma": Flag("fm: width of the Gaussian probability path"),
    "clip": Flag("dt: the noise schedule's alpha-bar clip, which sets the last block's loss weight"),
    "channels": Flag("conv widths of a block, three comma-separated numbers", metavar="N,N,N", list_as_text=True),
    "hidden": Flag("hidden width of a block"),
    "dropout": Flag("dropout in a block"),
    "norm": Flag("dt, backprop: normalisation in a block: batch (Figure 6) or layer (no running statistics to "
                 "skew)", listed=NORM_KINDS),
    "z_skip": Flag("dt: each block adds the closed-form class posterior given z_{t-1} to its logits and learns only "
                   "what x adds (not Figure 6; --no-z-skip is the paper's block)"),
    "readout": Flag("dt: how the blocks make a prediction: ensemble (the geometric mean of every block's posterior "
                    "from the image alone, so that under label skew no single block decides; not the paper's) or "
                    "chain (Eq. 3: z_T through every block, read by the head)", listed=READOUTS),
    "z_dropout": Flag("dt: share of each training batch whose z_{t-1} is zeroed, so that every block also learns to "
                      "read the label from the image alone, as the ensemble readout uses it (0 = off)"),
    "head_steps": Flag("dt: steps the server trains the output head each round, class-balanced on q(z_T | y), "
                       "no images (0 = off: the averaged head of the clients)"),
    "logit_adjust": Flag("dt: clients add their local label prior to the logits while training (balanced "
                         "softmax), so a block does not learn its last owner's label mix"),
    "coverage_step": Flag("dt: a block moves from its weights towards its owners' mean only by the share of the "
                          "classes those owners hold together (from discovery), so an owner with 2 of 10 classes "
                          "cannot overwrite what the block knew of the other 8"),
    "label_aware": Flag("dt: the plan picks a block's owners to hold as many classes together as they can, and "
                        "hands a block on to owners whose classes differ, from the class sets clients report in "
                        "discovery"),
    "plan_by_speed": Flag("dt: a client's share of the blocks follows the throughput it measured at discovery as "
                          "well as its data"),
    "split_local_data": Flag("dt: each of a client's k blocks trains on its own 1/k of the local data, so a round "
                             "costs one block-epoch whatever k is (with replicate: more owners per block at the "
                             "same compute)"),
    "min_local_steps": Flag("a client raises its local epochs until its local data gives at least this many "
                            "optimizer steps a round, per block it trains (with --split-local-data: over its "
                            "blocks' shares together; FedAvg clients: per round) (0 = off)"),
    "dataset": Flag("dataset the server evaluates on (its test split): fashion-mnist, mnist, cifar10, cifar100, "
                    "imagefolder:DIR or npz:FILE", metavar="SPEC"),
    "data_root": Flag("folder holding the datasets", metavar="DIR", default="$NOPROP_DATA, else ./data"),
    "client_data": Flag("dataset of clients that name none", metavar="SPEC", default="--dataset"),
    "partition_type": Flag("how clients that name none split their data: iid, dirichlet:ALPHA (label skew) or "
                           "classes:K (K classes per client)", metavar=PARTITIONS),
    "eval_limit": Flag("test examples evaluated each round (0 = all)"),
    "final_eval_limit": Flag("test examples evaluated after the last round", default="0, all of them"),
    "eval_mode": Flag("inference mode for evaluation", listed=("deterministic", "stochastic")),
    "eval_in_background": Flag("evaluate and checkpoint round r while round r+1 trains, off the rounds' critical "
                               "path (a crash then can lose round r too: --resume continues from the checkpoint "
                               "before it)"),
    "client_eval": Flag("also ask the clients to evaluate each round's model on their own test data (dt: the clients "
                        "that can hold every block); metrics.jsonl's client_accuracy, weighted by their examples"),
    "out": Flag("output folder: metrics.jsonl, checkpoint.pt, accuracy.png, ownership.png, DONE.json",
                metavar="DIR"),
    "resume": Flag("continue from OUT/checkpoint.pt"),
    "seed": Flag("random seed"),
    "round_timeout": Flag("seconds a round waits for replies; later replies are dropped and the node planned out",
                          metavar="S"),
    "join_timeout": Flag("seconds the first round waits for --min-clients clients", metavar="S"),
    "rejoin_timeout": Flag("seconds a later round waits for --min-clients clients to be back (a restarted "
                           "client rejoins) before it goes on with fewer (at most --join-timeout)", metavar="S"),
    "reply_poll_s": Flag("seconds between the server's looks for replies (Flower's own Grid waits 3)", metavar="S"),
    "client_threads": Flag("torch threads per client process", default="0, torch's own choice"),
    "aggregation": Flag("how replies are combined: dt: the shared embedding and head; the other methods: the whole "
                        "network (Flower's FedAvg, FedMedian or FedTrimmedAvg). mean (weighted by examples), or "
                        "median / trimmed-mean (coordinate-wise, robust to a few poisoned nodes; need 3+ replies "
                        "to differ)", listed=AGGREGATIONS),
    "trim_fraction": Flag("--aggregation trimmed-mean: share of the replies cut at each end of every coordinate"),
    "max_value_ratio": Flag("reject a reply holding a value above this many times the largest magnitude of the "
                            "same global tensor (above 1)"),
}
# settings that only some methods read: given for another method, they are ignored, and the launchers say so
APPLIES_TO = {"T": ("dt", "backprop"), "clip": ("dt",), "eta": ("dt", "ct"), "norm": ("dt", "backprop"),
              "policy": ("dt",), "replicas": ("dt",), "steps": ("ct", "fm", "adjoint"), "solver": ("fm", "adjoint"),
              "fm_sigma": ("fm",), "z_skip": ("dt",), "readout": ("dt",), "z_dropout": ("dt",),
              "head_steps": ("dt",), "logit_adjust": ("dt",), "coverage_step": ("dt",), "label_aware": ("dt",),
              "plan_by_speed": ("dt",), "split_local_data": ("dt",)}
PATH_FIELDS = ("out", "data_root")  # resolved to absolute paths: Flower's processes run elsewhere
DATASET_FIELDS = ("dataset", "client_data")  # npz:FILE / imagefolder:DIR specs get an absolute path


def add_federation_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = (),
                         defaults: dict[str, str] | None = None) -> dict[str, str]:
    """One flag per FederationConfig field (booleans --x/--no-x), the friendly aliases and ``--config TOML``, in
    one group of the help; ``defaults`` says where a launcher's default differs from FederationConfig's. Returns
    {field name: primary flag}."""
    group = parser.add_argument_group("run settings (defaults from noprop.federation.FederationConfig)")
    return add_flags(group, FederationConfig, FEDERATION_FLAGS, dest_prefix=FLAG_DEST_PREFIX, show_defaults=True,
                     skip=skip, defaults=defaults,
                     config_help="TOML file of run settings: keys = these flags' names (dashes or underscores), at "
                                 "the top level, in a [federation] table or in a Flower app's "
                                 "[tool.flwr.app.config]; flags win over it")


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


def ignored_settings(cfg: FederationConfig, overrides: dict[str, object]) -> list[str]:
    """One warning per setting given (flag or TOML) that cfg.method does not read, e.g. --clip for ct."""
    return [f"WARNING: {flag_name(name)} applies to {', '.join(methods)} only: ignored for --method {cfg.method}"
            for name, methods in APPLIES_TO.items() if name in overrides and cfg.method not in methods]
