"""Flags and config of a federated run: one flag per FederationConfig field, its TOML file, and absolute paths."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from noprop.federation import FederationConfig  # torch-free: its method checks build config dataclasses only
from noprop.ops.cli import LaunchError

# ----------------------------------------------------------------------------------------------------------
# Run flags generated from FederationConfig

# friendly names kept next to the generated ones (--rounds is --num-rounds, --min-clients is --min-nodes)
FLAG_ALIASES = {"num_rounds": ("--rounds",), "min_nodes": ("--min-clients",)}
FLAG_HELP = {
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
PATH_FIELDS = ("out", "data_root")  # resolved to absolute paths: Flower's processes run elsewhere
DATASET_FIELDS = ("dataset", "client_data")  # npz:FILE / imagefolder:DIR specs get an absolute path


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_default(f) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"FederationConfig.{f.name} has no default")


def _kind(default: object) -> type:
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return kind
    raise TypeError(f"FederationConfig default {default!r} is not bool, int, float or str")


def _int_flag(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float_flag(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_federation_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> dict[str, str]:
    """One flag per FederationConfig field (kebab-case; booleans get --x/--no-x), plus the friendly aliases
    and ``--config TOML``. Every flag defaults to None so that only what the user gave overrides.
    Returns {field name: primary flag}."""
    group = parser.add_argument_group("run settings (defaults from noprop.federation.FederationConfig)")
    group.add_argument("--config", metavar="TOML", default=None,
                       help="TOML file of run settings (keys = these flags' names, dashes or underscores); "
                            "flags win over it")
    flags = {}
    for f in fields(FederationConfig):
        if f.name in skip:
            continue
        default = field_default(f)
        kind = _kind(default)
        names = [flag_name(f.name), *FLAG_ALIASES.get(f.name, ())]
        help_text = f"{FLAG_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default!r})"
        dest = f"cfg_{f.name}"
        if kind is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            converter = {int: _int_flag, float: _float_flag, str: str}[kind]
            metavar = f.name.upper().replace("_", "-") if f.name != "T" else "T"
            group.add_argument(*names, dest=dest, type=converter, default=None, metavar=metavar, help=help_text)
        flags[f.name] = names[0]
    return flags


def load_config_toml(path: str | os.PathLike) -> dict[str, object]:
    """Run settings from a TOML file: FederationConfig field names (dashes or underscores), at the top level
    or in a [federation] table; unknown keys and wrong types are errors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise LaunchError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise LaunchError(f"config file {path} is not valid TOML: {exc}") from None
    if isinstance(raw.get("federation"), dict):
        raw = raw["federation"]
    known = {f.name: field_default(f) for f in fields(FederationConfig)}
    aliases = {alias.lstrip("-").replace("-", "_"): name for name, names in FLAG_ALIASES.items() for alias in names}
    values: dict[str, object] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name not in known:
            raise LaunchError(f"config file {path}: unknown key {key!r}; known keys: "
                              f"{', '.join(n.replace('_', '-') for n in known)}")
        values[name] = coerce(name, value, known[name], f"config file {path}: key {key!r}")
    return values


def coerce(name: str, value: object, default: object, where: str) -> object:
    kind = _kind(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise LaunchError(f"{where} must be true or false, not {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise LaunchError(f"{where} must be a whole number, not {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise LaunchError(f"{where} must be a number, not {value!r}")
    if isinstance(value, str):
        return value
    if name == "channels" and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return ",".join(str(v) for v in value)
    raise LaunchError(f"{where} must be a string, not {value!r}")


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
    values: dict[str, object] = {}
    if getattr(args, "config", None):
        values.update(load_config_toml(args.config))
    values.update(extra or {})
    for f in fields(FederationConfig):
        given = getattr(args, f"cfg_{f.name}", None)
        if given is not None:
            values[f.name] = given
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


def check_partitioning(spec: str, what: str) -> None:
    """A partitioning spec (iid, dirichlet:ALPHA, classes:K) parses; LaunchError ``what: why`` otherwise. The parser
    lives with the partitioners in noprop.data, which imports torch: a launcher calls it in a child
    (:func:`check_partitioning_in_child`) or in a check that loads data anyway."""
    from noprop.data import DatasetError, parse_partitioning

    try:
        parse_partitioning(spec)
    except DatasetError as exc:
        raise LaunchError(f"{what}: {exc}") from None


def check_partitioning_in_child(payload: dict) -> dict:
    """check_in_subprocess target: {"spec": ..., "what": ...} -> {} or a LaunchError."""
    check_partitioning(str(payload["spec"]), str(payload["what"]))
    return {}
