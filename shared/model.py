"""NoProp-DT: T independently trained denoising blocks, a class embedding and an output head.

Each block t learns to guess the label embedding u_y from the image x and a noised embedding z_{t-1}
drawn in closed form from q(z_{t-1} | y). Nothing flows between blocks during training, so any subset of
blocks can be trained anywhere (that is what the federation relies on). At inference the blocks run as a
chain from noise: z_t = a_t u_hat_t + b_t z_{t-1} + sqrt(c_t) eps, and the head reads z_T.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from noprop.model_configs import NORM_KINDS, PROTOTYPE_SCALES, NoPropConfig, parse_embedding

# -- class embeddings ----------------------------------------------------------------------------------


class ClassEmbedding(nn.Module):
    """The matrix W (classes x d). One-hot is fixed; learned and prototype rows are trained."""

    def __init__(self, kind: str, num_classes: int, dim: int, init: torch.Tensor | None = None,
                 lr_scale: float = 1.0):
        super().__init__()
        self.kind = kind
        if kind == "one-hot":
            weight = torch.eye(num_classes)
        elif init is not None:
            weight = init.detach().reshape(num_classes, dim).float().clone()
        elif kind == "learned":
            weight = torch.empty(num_classes, dim)
            if dim >= num_classes:
                nn.init.orthogonal_(weight)  # orthonormal rows: classes start equally far apart
            else:
                nn.init.normal_(weight, std=1.0 / math.sqrt(dim))
        else:  # prototype without data: callers restoring a checkpoint load the real rows afterwards
            weight = torch.zeros(num_classes, dim)
        self.weight = nn.Parameter(weight, requires_grad=kind != "one-hot")
        if lr_scale != 1.0:
            self.weight.lr_scale = lr_scale  # read by noprop.trainer.param_groups

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.weight[y]


def prototype_rows(x: torch.Tensor, y: torch.Tensor, num_classes: int, max_per_class: int = 1000,
                   seed: int = 0) -> torch.Tensor:
    """Per class, the training image with the smallest median distance to the other images of its class.

    Distances are computed on at most max_per_class images per class (seeded) to keep this O(k^2).
    """
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(len(x), -1).float()
    rows = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            raise ValueError(f"class {c} has no training examples: cannot build its prototype")
        if len(idx) > max_per_class:
            idx = idx[torch.randperm(len(idx), generator=g)[:max_per_class]]
        xc = flat[idx]
        dist = torch.cdist(xc, xc)
        if len(idx) > 1:
            # exclude each image's zero distance to itself
            dist = dist[~torch.eye(len(idx), dtype=torch.bool)].reshape(len(idx), len(idx) - 1)
        rows.append(xc[dist.median(dim=1).values.argmin()])
    return torch.stack(rows)


def scale_prototypes(rows: torch.Tensor, scale: str = "unit") -> tuple[torch.Tensor, float]:
    """(rows, lr_scale): "unit" divides every row by the rows' mean norm, "image" keeps the raw images.

    Raw normalised Fashion-MNIST prototypes lie 10 (nearest pair) to 28 (mean) noise standard deviations apart
    (the schedule's noise has unit variance per pixel), so q(z_t | y) gives the label away from block 2 on (the
    exact posterior given z_1 alone names it 85% of the time) and every later block learns to copy z instead of
    reading x (issue 12). Scaled to the mean
    norm of a one-hot row, z gives the label away as late as one-hot's does. One factor for all rows keeps the
    images' geometry. lr_scale is that factor: Adam moves every entry by about lr whatever its size, so
    entries 25x smaller need a learning rate 25x smaller to move, relative to their size, as the raw rows do
    (at the full rate the unit rows collapsed within an epoch, two classes 0.016 apart).
    """
    if scale not in PROTOTYPE_SCALES:
        raise ValueError(f"unknown prototype scale {scale!r}: use one of {', '.join(PROTOTYPE_SCALES)}")
    if scale == "image":
        return rows, 1.0
    factor = 1.0 / float(rows.norm(dim=1).mean())
    return rows * factor, factor


def class_posterior_logits(z: torch.Tensor, embedding: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """log q(y | z) up to a constant for z ~ N(sqrt(ab) u_y, (1 - ab) I) under a uniform label prior:
    (sqrt(ab) z . u_y - ab ||u_y||^2 / 2) / (1 - ab)."""
    return (math.sqrt(alpha_bar) * z @ embedding.T - 0.5 * alpha_bar * embedding.pow(2).sum(1)) / (1.0 - alpha_bar)


# -- the block of Figure 6 (left) ----------------------------------------------------------------------


def norm_layer(kind: str, features: int) -> nn.Module:
    """BatchNorm1d (Figure 6) or LayerNorm, which keeps no running statistics: a block trained by a node whose
    labels are skewed carries that node's feature statistics to inference in BatchNorm's running buffers."""
    if kind == "batch":
        return nn.BatchNorm1d(features)
    if kind == "layer":
        return nn.LayerNorm(features)
    raise ValueError(f"unknown norm {kind!r}: use one of {', '.join(NORM_KINDS)}")


def conv_path(in_channels: int, height: int, width: int, channels: tuple[int, int, int], hidden: int,
              dropout: float, batch_norm: bool = True, norm: str = "batch") -> nn.Sequential:
    """conv-ReLU-pool-drop, conv-ReLU-drop, conv-ReLU-pool-drop, flatten, FC, then a norm (DT) or ReLU (CT;
    padding 1)."""
    c1, c2, c3 = channels
    flat = c3 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
        nn.Flatten(), nn.Linear(flat, hidden), norm_layer(norm, hidden) if batch_norm else nn.ReLU(),
    )


def mlp_path(features: int, hidden: int, dropout: float, batch_norm: bool = True, norm: str = "batch") -> nn.Sequential:
    """The x path for flat feature vectors: two layers ending like the conv path (FC, then a norm or ReLU)."""
    return nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), norm_layer(norm, hidden) if batch_norm else nn.ReLU(),
    )


class ResidualZPath(nn.Module):
    """FC-BN-ReLU (= h), FC-BN-ReLU, FC-BN, plus h (BN or LayerNorm, by the config's norm)."""

    def __init__(self, dim: int, hidden: int, norm: str = "batch"):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(dim, hidden), norm_layer(norm, hidden), nn.ReLU())
        self.body = nn.Sequential(
            nn.Linear(hidden, hidden), norm_layer(norm, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), norm_layer(norm, hidden),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        return self.body(h) + h


class DenoisingBlock(nn.Module):
    """One NoProp-DT block: logits over classes from (x, z_{t-1}); u_hat = softmax(logits) @ W."""

    def __init__(self, cfg: NoPropConfig):
        super().__init__()
        hidden, norm = cfg.hidden, cfg.norm
        if cfg.is_image:
            c, h, w = cfg.input_shape
            self.x_path = conv_path(c, h, w, cfg.channels, hidden, cfg.dropout, norm=norm)
        else:
            self.x_path = mlp_path(cfg.input_shape[0], hidden, cfg.dropout, norm=norm)
        self.z_image_shape: tuple[int, ...] | None = None
        if parse_embedding(cfg.embedding)[0] == "prototype" and cfg.prototype_z_path == "conv":
            # z lives in image space: give it a conv path of the same shape as x's
            self.z_image_shape = cfg.input_shape
            c, h, w = cfg.input_shape
            self.z_path = conv_path(c, h, w, cfg.channels, hidden, cfg.dropout, norm=norm)
        else:
            self.z_path = ResidualZPath(cfg.embedding_dim, hidden, norm)
        self.fuse = nn.Sequential(
            nn.Linear(2 * hidden, hidden), norm_layer(norm, hidden), nn.ReLU(),
            nn.Linear(hidden, 128), norm_layer(norm, 128), nn.ReLU(),
            nn.Linear(128, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.z_image_shape is not None:
            z = z.reshape(z.shape[0], *self.z_image_shape)
        return self.fuse(torch.cat([self.x_path(x), self.z_path(z)], dim=1))

    def denoise(self, x: torch.Tensor, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(x, z), dim=1) @ embedding


# -- output head ---------------------------------------------------------------------------------------


class OutputHead(nn.Module):
    """p(y | z_T): softmax(Linear(z)), or the radial variant exp(-||softmax(Linear(z)) W - u_y||^2 / 2 s^2)."""

    def __init__(self, dim: int, num_classes: int, kind: str = "softmax", sigma: float = 0.5):
        super().__init__()
        self.kind = kind
        self.sigma = sigma
        self.linear = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def init_nearest_embedding(self, embedding: torch.Tensor) -> None:
        """Start as argmin_y ||z - u_y||: logits z . u_y - ||u_y||^2 / 2, a linear map.

        The head's only signal is the CE on z_T ~ q(z_T | y). A random start misreads a correct z_T for
        hundreds of steps: NoProp-CT stalled at 76% on the synthetic task, and a federated NoProp-DT head
        (a few dozen steps per node per round, averaged) read a chain whose nearest embedding was 87% right
        as 60% (issue 10). This start is right from step one; the CE then refines it.
        """
        self.linear.weight.copy_(embedding)
        self.linear.bias.copy_(-0.5 * embedding.pow(2).sum(1))

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Logits over classes."""
        logits = self.linear(z)
        if self.kind == "softmax":
            return logits
        y_tilde = F.softmax(logits, dim=1) @ embedding
        return -torch.cdist(y_tilde, embedding).pow(2) / (2 * self.sigma**2)


# -- the chain -----------------------------------------------------------------------------------------


class ChainPredictor:
    """predict_proba / predict for any chain whose forward gives probabilities (NoProp-DT, backprop; the
    continuous methods through noprop.continuous.ContinuousPredictor, whose chain length is its step count)."""

    def chain_length(self, steps: int | None) -> int:
        """How many steps follow z_0 (T blocks here): the stochastic mode draws one noise for z_0 and each."""
        return self.T

    def run_chain(self, x: torch.Tensor, noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        return self(x, noise)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, mode: str = "deterministic",
                      generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Eval-mode probabilities; mode 'stochastic' draws z_0 and every eps, 'deterministic' uses none."""
        if mode not in ("deterministic", "stochastic"):
            raise ValueError(f"mode must be deterministic or stochastic, got {mode!r}")
        was_training = self.training
        self.eval()
        try:
            noise = None
            if mode == "stochastic":
                d = self.embedding.weight.shape[1]
                n = self.chain_length(steps)
                noise = torch.randn(n + 1, x.shape[0], d, generator=generator).to(x.device, x.dtype)
            return self.run_chain(x, noise, steps)
        finally:
            self.train(was_training)

    def predict(self, x: torch.Tensor, mode: str = "deterministic",
                generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        return self.predict_proba(x, mode, generator, steps).argmax(dim=1)


class NoPropDT(ChainPredictor, nn.Module):
    """T denoising blocks, the class embedding W and the output head, with the schedule's coefficients.

    Blocks live in a ModuleDict keyed "1".."T" (state_dict keys "blocks.<t>.*"), so a federated client can
    build only the blocks it owns (owned_blocks) and exchange them under the same keys as the full model.
    """

    def __init__(self, cfg: NoPropConfig, embedding_init: torch.Tensor | None = None,
                 owned_blocks: Iterable[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.schedule()
        kind, _ = parse_embedding(cfg.embedding)
        d = cfg.embedding_dim
        self.embedding = ClassEmbedding(kind, cfg.num_classes, d, embedding_init, cfg.embedding_lr_scale)
        owned = sorted(set(range(1, cfg.T + 1) if owned_blocks is None else owned_blocks))
        if not owned or owned[0] < 1 or owned[-1] > cfg.T:
            raise ValueError(f"owned blocks must be a non-empty subset of 1..{cfg.T}, got {owned}")
        self.blocks = nn.ModuleDict({str(t): DenoisingBlock(cfg) for t in owned})
        self.head = OutputHead(d, cfg.num_classes, cfg.head, cfg.radial_sigma)
        self.head.init_nearest_embedding(self.embedding.weight)

    @property
    def T(self) -> int:
        return self.cfg.T

    def block(self, t: int) -> DenoisingBlock:
        """Block t (1-based), as the paper numbers them."""
        return self.blocks[str(t)]

    @property
    def owned_blocks(self) -> list[int]:
        return sorted(int(k) for k in self.blocks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every block's loss updates: the head and (when learned) the embedding."""
        params = list(self.head.parameters())
        if self.embedding.weight.requires_grad:
            params.append(self.embedding.weight)
        return params

    def block_logits(self, t: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Block t's logits over classes from (x, z_{t-1}); with z_skip, plus the class posterior given z alone."""
        logits = self.block(t)(x, z)
        if self.cfg.z_skip:
            logits = logits + self.z_posterior_logits(t, z)
        return logits

    def z_posterior_logits(self, t: int, z: torch.Tensor) -> torch.Tensor:
        """log q(y | z_{t-1}) up to a constant, under a uniform label prior: for z ~ N(sqrt(ab) u_y, (1 - ab) I),
        (sqrt(ab) z . u_y - ab ||u_y||^2 / 2) / (1 - ab), with ab = alpha_bar_{t-1}.

        What z says about the label is known in closed form, for every class alike. Added to the block's logits
        (z_skip), the block learns only what x adds to it, and its reading of z cannot forget a class that its
        last owner never saw: under label skew, later blocks (which lean on z) otherwise drop whole classes.
        """
        return class_posterior_logits(z, self.embedding.weight, self.schedule.alpha_bar_at(t - 1))

    def block_loss(self, t: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                   log_prior: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """L_t of Eq. 8 averaged over the batch; touches only block t, the head and W.

        CE + KL + (T / 2) eta (SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2 with z_{t-1} and the CE's
        z_T both drawn from q( . | y): the CE never sees x, so it trains only the head and W. log_prior (the
        training data's label prior, logs; None = off) adjusts the block's and the head's logits during
        training only (balanced softmax), so that neither learns the local label mix.
        """
        W = self.embedding.weight
        u = W[y]
        z_prev = self.schedule.sample_marginal(u, t - 1, generator=generator)
        if self.cfg.z_dropout:  # these rows see z = 0, as the ensemble readout shows every block
            device = generator.device if generator is not None else u.device
            keep = torch.rand(u.shape[0], 1, generator=generator, device=device).to(u.device) >= self.cfg.z_dropout
            z_prev = z_prev * keep.to(z_prev.dtype)
        logits = self.block_logits(t, x, z_prev)
        if log_prior is not None:
            logits = logits + log_prior
        u_hat = F.softmax(logits, dim=1) @ W
        l2 = (u_hat - u).pow(2).sum(dim=1)
        z_T = self.schedule.sample_marginal(u, self.T, generator=generator)
        head_logits = self.head(z_T, W)
        if log_prior is not None and self.head.kind == "softmax":
            head_logits = head_logits + log_prior
        ce = F.cross_entropy(head_logits, y, reduction="none")
        kl = self.schedule.kl_prior(u)
        weight = 0.5 * self.T * self.cfg.eta * self.schedule.delta_snr_at(t)
        loss = (ce + kl + weight * l2).mean()
        parts = {"loss": loss.item(), "l2": l2.mean().item(), "ce": ce.mean().item()}
        return loss, parts

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities by the config's readout: the inference chain (noise [T + 1, N, d], or None for the
        deterministic chain: z_0 = 0, eps = 0), or the blocks' ensemble (deterministic; noise is not used).

        Takes no labels: accuracy measured through here cannot leak y.
        """
        if self.cfg.readout == "ensemble":
            return F.softmax(self.ensemble_log_probs(x), dim=1)
        z = self.chain(x, noise)
        return F.softmax(self.head(z, self.embedding.weight), dim=1)

    def ensemble_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over blocks of log softmax(block t's own logits at z = 0): a geometric mean of T posteriors.

        At z = 0 (nothing known of the label yet) a block's logits say what x alone tells it; with z_skip they are
        exactly the part the block learned from images. In a federation each block was last trained by different
        owners, so under label skew each one leans to its last owners' classes; the chain ends on the last block
        (z_T is 0.996 of its guess at the default clip), while the mean lets no single block decide. Blocks run
        independently of each other. Measured on the same weights (BENCHMARKS.md, "The ensemble readout"): 2
        classes a client 50.5% against the chain's 35.4%, IID 86.6% against 86.2%.
        """
        if len(self.blocks) != self.T:
            raise RuntimeError(f"inference needs all {self.T} blocks; this model holds {self.owned_blocks}")
        z = torch.zeros(x.shape[0], self.embedding.weight.shape[1], device=x.device, dtype=x.dtype)
        total = 0
        for t in range(1, self.T + 1):
            total = total + F.log_softmax(self.block(t)(x, z), dim=1)
        return total / self.T

    def chain(self, x: torch.Tensor, noise: torch.Tensor | None = None,
              on_block: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """z_T by Eq. 3 from z_0 (noise[0], or 0 when noise is None); on_block(t, p_t) sees every block's class
        probabilities on the way (u_hat_t = p_t W; the diagnostics read them). Takes no labels."""
        if len(self.blocks) != self.T:
            raise RuntimeError(f"inference needs all {self.T} blocks; this model holds {self.owned_blocks}")
        W = self.embedding.weight
        z = torch.zeros(x.shape[0], W.shape[1], device=x.device, dtype=x.dtype) if noise is None else noise[0]
        for t in range(1, self.T + 1):
            probs = F.softmax(self.block_logits(t, x, z), dim=1)
            if on_block is not None:
                on_block(t, probs)
            z = self.schedule.step(t, probs @ W, z, None if noise is None else noise[t])
        return z
