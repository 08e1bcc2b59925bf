"""The backprop baseline: the same blocks, embedding and head, trained end to end.

z_0 ~ N(0, I); z_t = (1 - alpha_t) z_{t-1} + alpha_t u_hat_t(z_{t-1}, x) with alpha_t = tanh(w_t) learned;
one cross-entropy on the head's reading of z_T and one backward pass through the whole chain. This is
the comparison NoProp's accuracy and memory claims are made against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from noprop.model import ChainPredictor, ClassEmbedding, DenoisingBlock, OutputHead
from noprop.model_configs import NoPropConfig, parse_embedding


class BackpropChain(ChainPredictor, nn.Module):
    def __init__(self, cfg: NoPropConfig, embedding_init: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        kind, _ = parse_embedding(cfg.embedding)
        d = cfg.embedding_dim
        self.embedding = ClassEmbedding(kind, cfg.num_classes, d, embedding_init, cfg.embedding_lr_scale)
        self.blocks = nn.ModuleList(DenoisingBlock(cfg) for _ in range(cfg.T))
        self.head = OutputHead(d, cfg.num_classes, cfg.head, cfg.radial_sigma)
        # alpha_t = tanh(w_t) starts at 0.5: each step moves z halfway towards the block's guess
        self.mix = nn.Parameter(torch.full((cfg.T,), math.atanh(0.5)))

    @property
    def T(self) -> int:
        return self.cfg.T

    def logits(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        W = self.embedding.weight
        z = torch.zeros(x.shape[0], W.shape[1], device=x.device, dtype=x.dtype) if z0 is None else z0
        alphas = torch.tanh(self.mix)
        for t in range(self.T):
            z = (1 - alphas[t]) * z + alphas[t] * self.blocks[t].denoise(x, z, W)
        return self.head(z, W)

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        d = self.embedding.weight.shape[1]
        z0 = torch.randn(x.shape[0], d, generator=generator).to(x.device, x.dtype)
        return F.cross_entropy(self.logits(x, z0), y)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities; noise [T + 1, N, d] (only noise[0] is used: the chain adds none) or None for z_0 = 0."""
        return F.softmax(self.logits(x, None if noise is None else noise[0]), dim=1)
