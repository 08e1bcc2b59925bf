"""What the continuous-time methods (NoProp-CT, NoProp-FM, the adjoint neural ODE) share.

One network serves every time t in [0, 1], so there are no blocks to own: the config, the block of the
paper's Figure 6 (right: a sinusoidal time embedding, no batch norm anywhere) and a predictor that
integrates from t = 0 to 1 in a chosen number of steps live here, once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from noprop.model import ChainPredictor, ClassEmbedding, OutputHead, conv_path, mlp_path
from noprop.model_configs import ContinuousConfig, parse_embedding


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[N] times in [0, 1] -> [N, dim] sin/cos features of t * scale at geometric frequencies (1 .. 1/10^4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = (t * scale).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_time_embedding(t, self.dim)


class TimeConditionedBlock(nn.Module):
    """Figure 6 (right): logits over classes from (x, z_t, t); no batch norm, so any batch size and t work.

    The x path is split off (features) so that inference, which evaluates the block at many t for the
    same x, runs the conv path once per image instead of once per step.
    """

    def __init__(self, cfg: ContinuousConfig):
        super().__init__()
        hidden = cfg.hidden
        if cfg.is_image:
            c, h, w = cfg.input_shape
            self.x_path = conv_path(c, h, w, cfg.channels, hidden, cfg.dropout, batch_norm=False)
        else:
            self.x_path = mlp_path(cfg.input_shape[0], hidden, cfg.dropout, batch_norm=False)
        self.z_image_shape: tuple[int, ...] | None = None
        if parse_embedding(cfg.embedding)[0] == "prototype" and cfg.prototype_z_path == "conv":
            self.z_image_shape = cfg.input_shape
            c, h, w = cfg.input_shape
            self.z_path = conv_path(c, h, w, cfg.channels, hidden, cfg.dropout, batch_norm=False)
        else:
            self.z_path = nn.Sequential(nn.Linear(cfg.embedding_dim, hidden), nn.ReLU())
        self.t_path = nn.Sequential(TimeEmbedding(cfg.time_dim), nn.Linear(cfg.time_dim, hidden), nn.ReLU())
        self.fuse = nn.Sequential(
            nn.Linear(3 * hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 128), nn.ReLU(),
            nn.Linear(128, cfg.num_classes),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_path(x)

    def logits(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Logits from x's features, z_t [N, d] and t (a float or [N])."""
        t = torch.as_tensor(t, device=z.device, dtype=z.dtype).expand(z.shape[0])
        if self.z_image_shape is not None:
            z = z.reshape(z.shape[0], *self.z_image_shape)
        return self.fuse(torch.cat([features, self.z_path(z), self.t_path(t)], dim=1))

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.logits(self.features(x), z, t)


class ContinuousPredictor(ChainPredictor):
    """predict_proba / predict for a model whose forward(x, noise, steps) integrates t from 0 to 1.

    'deterministic' starts at z_0 = 0 and adds no noise (what an export unrolls); 'stochastic' draws z_0
    and every step's noise. steps overrides the config's number of integration steps.
    """

    def build_shared_parts(self, cfg: ContinuousConfig, embedding_init: torch.Tensor | None) -> None:
        """The parts every one-network model has: its config, the class embedding, the time-conditioned
        block and the output head (call after nn.Module.__init__)."""
        self.cfg = cfg
        kind, _ = parse_embedding(cfg.embedding)
        self.embedding = ClassEmbedding(kind, cfg.num_classes, cfg.embedding_dim, embedding_init,
                                        cfg.embedding_lr_scale)
        self.block = TimeConditionedBlock(cfg)
        self.head = OutputHead(cfg.embedding_dim, cfg.num_classes, cfg.head, cfg.radial_sigma)

    def chain_length(self, steps: int | None) -> int:
        return steps or self.cfg.steps

    def run_chain(self, x: torch.Tensor, noise: torch.Tensor | None, steps: int | None) -> torch.Tensor:
        return self(x, noise, self.chain_length(steps))


def start_state(x: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """z_0: zeros (deterministic) or noise[0]."""
    if noise is None:
        return torch.zeros(x.shape[0], embedding.shape[1], device=x.device, dtype=x.dtype)
    return noise[0]


def nearest_embedding_proba(z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """softmax(-||z - u_y||^2): its argmax is the nearest class embedding (a score, not a calibrated probability)."""
    return F.softmax(-torch.cdist(z, embedding).pow(2), dim=1)
