"""noprop-train's settings: one dataclass, filled from defaults, then a TOML file, then flags (noprop.settings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from noprop.methods import METHODS, method_named, model_config
from noprop.model_configs import (
    ADJOINT_SOLVERS,
    CT_L2_WEIGHTS,
    FM_SOLVERS,
    HEAD_KINDS,
    PROTOTYPE_SCALES,
    PROTOTYPE_Z_PATHS,
    READOUTS,
    ContinuousConfig,
    NoPropConfig,
    parse_embedding,
)
from noprop.settings import SettingsError, layered

EVAL_MODES = ("deterministic", "stochastic", "both")


@dataclass
class TrainConfig:
    method: str = "dt"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    download: bool = False
    subset: int | None = None
    eval_limit: int | None = None
    epochs: int = 5
    T: int = 10
    embedding: str = "one-hot"
    prototype_scale: str | None = None  # prototype rows: unit (mean norm 1) | image (raw); None: the method's own
    prototype_z_path: str | None = None  # prototype z read by conv (the paper) | linear; None: the method's own
    head: str = "softmax"
    radial_sigma: float = 0.5
    eta: float | None = None  # None: the paper's value for the method (dt 0.1, ct 1.0)
    clip: float = 1e-4
    max_delta_snr: float | None = None
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.2
    norm: str = "batch"  # dt / backprop: batch (Figure 6) | layer
    z_skip: bool = False  # dt: blocks add the closed-form class posterior given z (not Figure 6)
    z_dropout: float = 0.0  # dt: share of a batch whose z_{t-1} is zeroed in training
    readout: str = "chain"  # dt: chain (Eq. 3, the paper's) | ensemble (the blocks on x alone; the federation's)
    steps: int | None = None  # ct / fm / adjoint: integration steps (None: the method's measured default)
    solver: str | None = None  # fm: euler | heun; adjoint: euler | midpoint | rk4 (None: euler)
    fm_sigma: float = 0.1  # fm: width of the Gaussian probability path
    ct_l2_weight: str | None = None  # ct: snr (Eq. 9) | log-snr (-gamma'(t)); None: CTConfig's measured default
    grad_clip: float | None = None  # ct: largest gradient norm of a step (0 = off); None: CTConfig's default
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 128
    eval_mode: str = "both"
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    out: str | None = None

    def validate(self) -> TrainConfig:
        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"{name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"use one of {', '.join(METHODS)}")
        if self.eta is None:
            self.eta = 1.0 if self.method == "ct" else 0.1
        if self.steps is not None and self.steps < 1:
            raise bad("steps", "must be at least 1")
        if self.steps is not None and not method_named(self.method).continuous:
            fixed = "is one network call" if self.method == "cnn" else "has T blocks (--T)"
            raise bad("steps", f"applies to ct, fm and adjoint; {self.method} {fixed}")
        solvers = {"fm": FM_SOLVERS, "adjoint": ADJOINT_SOLVERS}.get(self.method, ())
        if self.solver is not None and self.solver not in solvers:
            raise bad("solver", f"use one of {', '.join(solvers)}" if solvers else "applies to fm and adjoint only")
        if self.readout not in READOUTS:
            raise bad("readout", f"use one of {', '.join(READOUTS)}")
        if self.z_dropout and self.method != "dt":
            raise bad("z_dropout", "applies to dt only")
        if self.readout != "chain" and self.method != "dt":
            raise bad("readout", "applies to dt only (the other methods read out their one network)")
        if self.method != "ct":
            for name in ("ct_l2_weight", "grad_clip"):
                if getattr(self, name) is not None:
                    raise bad(name, "applies to ct only")
        if self.ct_l2_weight is not None and self.ct_l2_weight not in CT_L2_WEIGHTS:
            raise bad("ct_l2_weight", f"use one of {', '.join(CT_L2_WEIGHTS)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise bad("grad_clip", "must be 0 (off) or positive")
        if self.fm_sigma < 0:
            raise bad("fm_sigma", "must be zero or positive")
        for name in ("epochs", "T", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("lr", "eta", "radial_sigma"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be zero or positive")
        if not 0 < self.clip < 0.5:
            raise bad("clip", "must lie in (0, 0.5); 1e-4 is the spec's value")
        if self.max_delta_snr is not None and self.max_delta_snr <= 0:
            raise bad("max_delta_snr", "must be positive (or unset)")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must lie in [0, 1)")
        if self.subset is not None and self.subset < 1:
            raise bad("subset", "must be a positive number of training examples")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise bad("eval_limit", "must be a positive number of test examples")
        if self.prototype_scale is None:
            self.prototype_scale = method_named(self.method).prototype_scale
        if self.prototype_scale not in PROTOTYPE_SCALES:
            raise bad("prototype_scale", f"use one of {', '.join(PROTOTYPE_SCALES)}")
        if self.prototype_z_path is None:
            self.prototype_z_path = method_named(self.method).prototype_z_path
        if self.prototype_z_path not in PROTOTYPE_Z_PATHS:
            raise bad("prototype_z_path", f"use one of {', '.join(PROTOTYPE_Z_PATHS)}")
        if self.head not in HEAD_KINDS:
            raise bad("head", f"use one of {', '.join(HEAD_KINDS)}")
        if self.eval_mode not in EVAL_MODES:
            raise bad("eval_mode", f"use one of {', '.join(EVAL_MODES)}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise bad("device", "use auto, cpu, cuda, cuda:N or mps")
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise bad("channels", "give three positive conv widths, e.g. 32,64,128")
        try:
            parse_embedding(self.embedding)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return self

    def model_config(self, input_shape: tuple[int, ...], num_classes: int,
                     embedding_lr_scale: float = 1.0) -> NoPropConfig | ContinuousConfig:
        """The config of the method's model (NoPropConfig for dt/backprop, CTConfig / FMConfig / AdjointConfig,
        CNNConfig for cnn)."""
        try:
            return model_config(self.method, input_shape, num_classes, T=self.T, embedding=self.embedding,
                                head=self.head, radial_sigma=self.radial_sigma, channels=self.channels,
                                hidden=self.hidden, dropout=self.dropout, eta=self.eta, clip=self.clip,
                                max_delta_snr=self.max_delta_snr, steps=self.steps, solver=self.solver,
                                fm_sigma=self.fm_sigma, norm=self.norm, z_skip=self.z_skip, readout=self.readout,
                                z_dropout=self.z_dropout,
                                embedding_lr_scale=embedding_lr_scale, ct_l2_weight=self.ct_l2_weight,
                                grad_clip=self.grad_clip, prototype_z_path=self.prototype_z_path)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(toml_path: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults < TOML file (top level or a [train] table) < flags (overrides whose value is not None)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    values = layered(TrainConfig, toml_path, given, table="train")
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise SettingsError(str(exc)) from None
    return cfg.validate()
