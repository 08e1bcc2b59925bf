"""The methods' model configs and their checks, without torch: what a checkpoint stores to rebuild a model.

NoPropConfig (dt, backprop), ContinuousConfig and its CTConfig, FMConfig and AdjointConfig (ct, fm, adjoint),
CNNConfig (cnn). Each checks itself when built, so a launcher validates a run's settings (build the method's
config from them) before anything imports torch; the models (noprop.model, noprop.ct, ...) read them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from noprop.schedule import CosineSchedule

EMBEDDING_KINDS = ("one-hot", "learned", "prototype")
PROTOTYPE_SCALES = ("unit", "image")  # unit: rows scaled to mean norm 1 (one-hot's); image: the raw normalised image
# how a block reads an image-sized prototype z: conv (the paper: z treated as an image, its own conv path) | linear
# (the FC path every other embedding has; issue 12)
PROTOTYPE_Z_PATHS = ("conv", "linear")
HEAD_KINDS = ("softmax", "radial")
NORM_KINDS = ("batch", "layer")  # batch: Figure 6; layer: no running statistics (federated label skew)
# how NoProp-DT turns its blocks into a prediction: chain (Eq. 3, the paper's) | ensemble (every block on x alone)
READOUTS = ("chain", "ensemble")


def parse_embedding(spec: str) -> tuple[str, int | None]:
    """'one-hot' | 'learned:D' | 'prototype' -> (kind, D or None)."""
    kind, _, dim = spec.partition(":")
    if kind not in EMBEDDING_KINDS:
        raise ValueError(f"unknown embedding {spec!r}: use one-hot, learned:D (e.g. learned:20) or prototype")
    if kind == "learned":
        if not dim.isdigit() or int(dim) < 1:
            raise ValueError(f"learned embedding needs a positive dimension, e.g. learned:20, got {spec!r}")
        return kind, int(dim)
    if dim:
        raise ValueError(f"embedding {kind!r} takes no dimension, got {spec!r}")
    return kind, None


def embedding_size(spec: str, num_classes: int, input_shape: tuple[int, ...]) -> int:
    """d of the class embedding: classes (one-hot), D (learned:D) or the image size (prototype)."""
    kind, dim = parse_embedding(spec)
    if kind == "one-hot":
        return num_classes
    if kind == "learned":
        return dim
    return math.prod(input_shape)


class ModelShape:
    """What every model config derives from its input shape, class count and embedding."""

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def embedding_dim(self) -> int:
        return embedding_size(self.embedding, self.num_classes, self.input_shape)


def normalise_and_check(cfg) -> None:
    """What every model config shares: tuples from lists (JSON), and the input, class count, head and
    embedding checked (NoPropConfig here, noprop.continuous.ContinuousConfig for the one-network methods)."""
    cfg.input_shape = tuple(int(s) for s in cfg.input_shape)
    cfg.channels = tuple(int(c) for c in cfg.channels)
    if len(cfg.input_shape) not in (1, 3):
        raise ValueError(f"input_shape must be (C, H, W) or (F,), got {cfg.input_shape}")
    if cfg.num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {cfg.num_classes}")
    if cfg.head not in HEAD_KINDS:
        raise ValueError(f"unknown head {cfg.head!r}: use softmax or radial")
    kind, _ = parse_embedding(cfg.embedding)
    if kind == "prototype" and len(cfg.input_shape) != 3:
        raise ValueError("prototype embeddings need image inputs (C, H, W)")
    if getattr(cfg, "prototype_z_path", "conv") not in PROTOTYPE_Z_PATHS:  # (a CNN config has neither)
        raise ValueError(f"unknown prototype_z_path {cfg.prototype_z_path!r}: use {', '.join(PROTOTYPE_Z_PATHS)}")
    if not getattr(cfg, "embedding_lr_scale", 1.0) > 0:
        raise ValueError(f"embedding_lr_scale must be positive, got {cfg.embedding_lr_scale}")
    if getattr(cfg, "norm", "batch") not in NORM_KINDS:
        raise ValueError(f"unknown norm {cfg.norm!r}: use batch (Figure 6) or layer")


@dataclass
class NoPropConfig(ModelShape):
    """Everything needed to rebuild a model; stored in every checkpoint."""

    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for feature vectors
    num_classes: int
    T: int = 10
    embedding: str = "one-hot"  # one-hot | learned:D | prototype
    head: str = "softmax"  # softmax | radial
    radial_sigma: float = 0.5  # sigma of the radial head; 1.0 let learned W shrink and collapse (measured)
    eta: float = 0.1
    clip: float = 1e-4  # alpha_bar clip, sets SNR(T)
    max_delta_snr: float | None = None  # optional cap on SNR(t) - SNR(t-1)
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.2
    norm: str = "batch"  # batch (Figure 6) | layer: the blocks' normalisation layers
    z_skip: bool = False  # add the exact class posterior given z_{t-1} alone to each block's logits (not Figure 6)
    # chain: z_T by Eq. 3, read by the head (the paper's); ensemble: the geometric mean of the blocks' class
    # posteriors given x alone (z = 0), which under label skew no single late block decides (not the paper's)
    readout: str = "chain"
    # training only: the share of a batch whose z_{t-1} is zeroed, so that block t also learns to read the label
    # from x alone, as the ensemble readout asks of it (0 = off, the paper's training)
    z_dropout: float = 0.0
    embedding_lr_scale: float = 1.0  # W trains at lr x this (unit-scaled prototypes: see scale_prototypes)
    prototype_z_path: str = "conv"  # prototype z through a conv path (Figure 6) or the residual FC path
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        normalise_and_check(self)
        if self.T < 1:
            raise ValueError(f"T must be at least 1, got {self.T}")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}: use {' or '.join(READOUTS)}")
        if not 0 <= self.z_dropout < 1:
            raise ValueError(f"z_dropout must lie in [0, 1), got {self.z_dropout}")

    def schedule(self) -> CosineSchedule:
        from noprop.schedule import CosineSchedule  # torch: only when a model is built

        return CosineSchedule(T=self.T, clip=self.clip, max_delta_snr=self.max_delta_snr)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NoPropConfig:
        return cls(**d)


@dataclass
class ContinuousConfig(ModelShape):
    """The architecture, embedding, head and inference steps; the subclasses add their method's settings."""

    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for feature vectors
    num_classes: int
    embedding: str = "one-hot"  # one-hot | learned:D | prototype
    head: str = "softmax"  # softmax | radial
    radial_sigma: float = 0.5
    steps: int = 10  # integration steps from t = 0 to 1 at inference (the length of an unrolled chain)
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.2
    time_dim: int = 64  # sinusoidal embedding of t
    embedding_lr_scale: float = 1.0  # W trains at lr x this (unit-scaled prototypes: see scale_prototypes)
    prototype_z_path: str = "conv"  # prototype z through a conv path (the paper) or FC-ReLU like other embeddings
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        normalise_and_check(self)
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.time_dim < 2 or self.time_dim % 2:
            raise ValueError(f"time_dim must be an even number >= 2, got {self.time_dim}")

    @property
    def T(self) -> int:
        """The inference chain's length: the number of integration steps."""
        return self.steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)


CT_L2_WEIGHTS = ("snr", "log-snr")


@dataclass
class CTConfig(ContinuousConfig):
    eta: float = 1.0  # weight of the SNR'-weighted L2 term (paper's Table 3: 1)
    gamma0: float = -5.0  # initial gamma(1), the label end: alpha_bar(1) = sigmoid(5) = 0.993
    gamma1: float = 5.0  # initial gamma(0), the noise end: alpha_bar(0) = sigmoid(-5) = 0.007
    steps: int = 10  # accuracy was flat from 1 to 100 steps on the synthetic task (bench/ode_steps.py)
    # the L2 term's weight over t: snr = Eq. 9's SNR'(t); log-snr = -gamma'(t), the same integrand spread evenly
    # in log-SNR (SNR'(t) spans 0.035 to 673, so t < 0.5, where the network must read x, gets < 1% of the loss).
    # log-snr is the default by measurement (not Eq. 9): Fashion-MNIST, 6000 images, 30 epochs: 86-88% against
    # 74-81% for snr, whose accuracy swung by up to 4.5 points an epoch (BENCHMARKS.md, issue 12)
    l2_weight: str = "log-snr"
    # largest gradient norm of a training step (0 = off; trainer.train_end_to_end_epoch). 1.0 by measurement: over
    # the last 10 of 30 epochs test accuracy moved by at most 0.75 points an epoch (2.0 without), and at lr 1e-2
    # the synthetic task no longer loses a class late in training
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.l2_weight not in CT_L2_WEIGHTS:
            raise ValueError(f"unknown l2_weight {self.l2_weight!r} for ct: use one of {', '.join(CT_L2_WEIGHTS)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be 0 (off) or positive, got {self.grad_clip}")
        if not self.gamma1 > self.gamma0:
            raise ValueError(f"gamma1 (noise end) must exceed gamma0 (label end), got {self.gamma0}, {self.gamma1}")


FM_SOLVERS = ("euler", "heun")


@dataclass
class FMConfig(ContinuousConfig):
    sigma: float = 0.1  # width of the Gaussian path around the straight line (the paper leaves it open)
    solver: str = "euler"  # euler | heun (two network calls per step)
    steps: int = 10  # accuracy was flat from 1 to 100 steps on the synthetic task (bench/ode_steps.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma < 0:
            raise ValueError(f"sigma must be zero or positive, got {self.sigma}")
        if self.solver not in FM_SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r} for fm: use one of {', '.join(FM_SOLVERS)}")


# fixed-grid torchdiffeq solvers: the step count, not a tolerance, sets the cost (as in the paper's T = 1000)
ADJOINT_SOLVERS = ("euler", "midpoint", "rk4")


@dataclass
class AdjointConfig(ContinuousConfig):
    solver: str = "euler"
    steps: int = 10  # used in training and at inference; training cost grows linearly with it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in ADJOINT_SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r} for adjoint: use one of {', '.join(ADJOINT_SOLVERS)}")


@dataclass
class CNNConfig(ModelShape):
    """Everything needed to rebuild the CNN; stored in every checkpoint.

    embedding and head stay at their defaults (one-hot, softmax) so that the tools that read any config
    (export metadata, ModelShape.embedding_dim = the number of classes) read this one too.
    """

    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for feature vectors
    num_classes: int
    embedding: str = "one-hot"  # the only value: the CNN has no class embedding
    head: str = "softmax"  # the only value: a linear layer and softmax
    channels: tuple[int, int, int] = (32, 64, 128)
    hidden: int = 256
    dropout: float = 0.2
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        normalise_and_check(self)
        if parse_embedding(self.embedding)[0] != "one-hot":
            raise ValueError(f"the cnn method has no class embedding: leave embedding at one-hot, "
                             f"not {self.embedding!r}")
        if self.head != "softmax":
            raise ValueError(f"the cnn method ends in a linear layer and softmax: leave head at softmax, "
                             f"not {self.head!r}")

    @property
    def T(self) -> int:
        """The inference chain's length: one network call."""
        return 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CNNConfig:
        return cls(**d)
