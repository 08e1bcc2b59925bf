"""The training methods by name: which config rebuilds a model, which class it is, which optimizer trains it, and
how it federates (the server's strategy, the node's trainer, the evaluation of a round's model).

`noprop-train --method`, the federation, checkpoints and the benchmarks all look methods up here, so a method is
added in one place and no `if method == "dt"` branch runs through the round. Parts are named by "module:name" and
imported when used: importing this module, and checking a method's settings with model_config, needs no torch (the
launchers do it), and the core imports nothing from the server or the client.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from noprop.model_configs import AdjointConfig, CNNConfig, CTConfig, FMConfig, NoPropConfig

if TYPE_CHECKING:
    import torch
    from torch import nn


def load(ref: str):
    """The object a "module:name" reference names, imported now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


FEDAVG_STRATEGY = "noprop.server.fedavg:checked_strategy"  # Flower's FedAvg family, replies checked first
FEDAVG_TRAINER = "noprop.client.fedavg:train_whole_network"  # a node trains the whole network it was sent
ACCURACY = "noprop.trainer:accuracy_report"  # {"accuracy": ...} of the method's own predict


@dataclass(frozen=True)
class Method:
    config_class: type
    model_path: str  # "module:Class" of the model (torch), imported by model_class
    optimizer: str  # per-block (NoProp-DT's BlockTrainer), adam or adamw (paper's Table 3)
    description: str
    # federated: the server's Strategy factory (cfg, model_cfg, model, log, history, on_phase), the node's trainer
    # (instructions, content, node, data) -> reply content, and the evaluator (model, data, mode, seed) -> metrics
    strategy: str = FEDAVG_STRATEGY
    trainer: str = FEDAVG_TRAINER
    evaluator: str = ACCURACY
    round_shape: str = "FedAvg of one {method} network"  # the round, for the launchers' first line (cfg's fields)
    # prototype embeddings, by measurement (BENCHMARKS.md "Prototype embeddings and NoProp-CT's stability"): rows
    # scaled to unit mean norm or the raw normalised images; z read by the FC path or the paper's conv path
    prototype_scale: str = "unit"
    prototype_z_path: str = "conv"  # conv (the paper) | linear: how a block reads an image-sized z

    @property
    def continuous(self) -> bool:
        return self.config_class in (CTConfig, FMConfig, AdjointConfig)

    @property
    def model_class(self) -> type:
        """The model's class, imported now (with torch)."""
        return load(self.model_path)


METHODS: dict[str, Method] = {
    "dt": Method(NoPropConfig, "noprop.model:NoPropDT", "per-block",
                 "NoProp-DT: T blocks, each trained on its own", prototype_z_path="linear",
                 # block ownership: each node trains the blocks it is given; every readout is evaluated
                 strategy="noprop.server.block_strategy:BlockOwnershipStrategy",
                 trainer="noprop.client.handlers:train_blocks", evaluator="noprop.diagnostics:chain_diagnostics",
                 round_shape="T={T}, policy {policy}"),
    "ct": Method(CTConfig, "noprop.ct:NoPropCT", "adam",
                 "NoProp-CT: one time-conditioned denoiser, learned noise schedule", prototype_z_path="linear"),
    "fm": Method(FMConfig, "noprop.fm:NoPropFM", "adam", "NoProp-FM: flow matching to the label embedding",
                 prototype_scale="image"),  # unit rows + FC z path: 67% deterministic but 33% stochastic (issue 12)
    "adjoint": Method(AdjointConfig, "noprop.adjoint:AdjointODE", "adamw",
                      "neural ODE over the CT block, adjoint gradients", prototype_scale="image"),
    "backprop": Method(NoPropConfig, "noprop.baseline:BackpropChain", "adamw",
                       "the DT blocks chained and trained end to end", prototype_scale="image"),
    "cnn": Method(CNNConfig, "noprop.cnn:CNN", "adamw",
                  "plain CNN (one block's x path + linear), backprop; the FedAvg peer"),
}


def method_named(name: str) -> Method:
    """The Method of a --method name; a one-line error naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(name: str, cfg, embedding_init: torch.Tensor | None = None) -> nn.Module:
    """The model of method `name` from its config (and, for prototype embeddings, the initial rows)."""
    spec = method_named(name)
    if not isinstance(cfg, spec.config_class):
        raise ValueError(f"method {name!r} needs a {spec.config_class.__name__}, got {type(cfg).__name__}")
    return spec.model_class(cfg, embedding_init)


def model_config(name: str, input_shape: tuple[int, ...], num_classes: int, *, T: int = 10,
                 embedding: str = "one-hot", head: str = "softmax", radial_sigma: float = 0.5,
                 channels: tuple[int, int, int] = (32, 64, 128), hidden: int = 256, dropout: float = 0.2,
                 eta: float | None = None, clip: float = 1e-4, max_delta_snr: float | None = None,
                 steps: int | None = None, solver: str | None = None, fm_sigma: float = 0.1, norm: str = "batch",
                 z_skip: bool = False, embedding_lr_scale: float = 1.0, ct_l2_weight: str | None = None,
                 grad_clip: float | None = None, prototype_z_path: str | None = None, readout: str = "chain",
                 z_dropout: float = 0.0):
    """The config of method `name`'s model from flat settings (noprop-train's and a federation's).

    None means the method's own default (eta: dt 0.1, ct 1.0; prototype_z_path: METHODS; steps, ct_l2_weight,
    grad_clip: the config class's measured default).
    Raises ValueError for settings the method rejects. cnn takes the architecture only (T, eta, clip and steps
    do not apply to it and are ignored, as backprop ignores steps).
    """
    common = {"input_shape": tuple(input_shape), "num_classes": num_classes, "embedding": embedding,
              "head": head, "radial_sigma": radial_sigma, "channels": tuple(channels), "hidden": hidden,
              "dropout": dropout, "embedding_lr_scale": embedding_lr_scale,
              "prototype_z_path": prototype_z_path or method_named(name).prototype_z_path}
    config_class = method_named(name).config_class
    if config_class is CNNConfig:
        unused = ("radial_sigma", "embedding_lr_scale", "prototype_z_path")  # a CNN has no class embedding
        return CNNConfig(**{k: v for k, v in common.items() if k not in unused})
    if config_class is NoPropConfig:
        return NoPropConfig(T=T, eta=0.1 if eta is None else eta, clip=clip, max_delta_snr=max_delta_snr, norm=norm,
                            z_skip=z_skip and name == "dt",  # the backprop chain has no z-skip, nor an ensemble
                            readout=readout if name == "dt" else "chain",
                            z_dropout=z_dropout if name == "dt" else 0.0, **common)
    if steps is not None:
        common["steps"] = steps
    if name == "ct":
        ct = {k: v for k, v in (("l2_weight", ct_l2_weight), ("grad_clip", grad_clip)) if v is not None}
        return CTConfig(eta=1.0 if eta is None else eta, **ct, **common)
    if name == "fm":
        return FMConfig(sigma=fm_sigma, solver=solver or "euler", **common)
    return config_class(solver=solver or "euler", **common)


def config_from_dict(name: str, d: dict):
    return method_named(name).config_class.from_dict(d)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The end-to-end optimizer of the paper's Table 3 (Adam for CT/FM, AdamW otherwise); DT uses BlockTrainer."""
    import torch

    from noprop.trainer import param_groups

    kind = method_named(name).optimizer
    if kind == "adam":
        return torch.optim.Adam(param_groups(params, lr), lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(param_groups(params, lr), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"method {name!r} trains block by block (BlockTrainer), not with one optimizer")
