"""NoProp-FM: flow matching from noise to the label embedding, conditioned on the image.

Training (the paper's Algorithm 3, Eqs. 10-13): z_0 ~ N(0, I), z_1 = u_y, t ~ U(0, 1),
z_t = t z_1 + (1 - t) z_0 + sigma eps; the network's v = logits . W (no softmax: any direction) regresses
the straight-line field z_1 - z_0. When W is learned, a cross-entropy on the head's reading of the
extrapolation z~_1 = z_t + (1 - t) v keeps the class embeddings apart. Inference integrates v from
t = 0 to 1 (Euler or Heun) and predicts the class whose embedding is nearest to z_1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noprop.continuous import ContinuousPredictor, nearest_embedding_proba, start_state
from noprop.model_configs import FMConfig


class NoPropFM(ContinuousPredictor, nn.Module):
    """State dict: embedding.weight, block.* (the one network), head.* (used by the anchor loss only)."""

    def __init__(self, cfg: FMConfig, embedding_init: torch.Tensor | None = None):
        super().__init__()
        self.build_shared_parts(cfg, embedding_init)

    @property
    def uses_anchor_loss(self) -> bool:
        """The anchor CE is needed (and added) only when W is learned; a fixed one-hot W cannot collapse."""
        return self.embedding.weight.requires_grad

    def velocity(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.block.logits(features, z, t) @ self.embedding.weight

    def path(self, z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, target field): z_t = t z_1 + (1 - t) z_0 (+ sigma eps), target z_1 - z_0."""
        t = t.unsqueeze(-1)
        z_t = t * z1 + (1 - t) * z0
        if eps is not None:
            z_t = z_t + self.cfg.sigma * eps
        return z_t, z1 - z0

    def loss(self, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 11 (fixed W) or Eq. 13 (learned W), averaged over the batch."""
        W = self.embedding.weight
        u = W[y]

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(x.device, x.dtype)

        z0 = randn(*u.shape)
        t = torch.rand(len(y), generator=generator).to(x.device, x.dtype)
        z_t, target = self.path(z0, u, t, randn(*u.shape))
        v = self.velocity(self.block.features(x), z_t, t)
        fm = (v - target).pow(2).sum(dim=1)
        loss = fm.mean()
        parts = {"fm": fm.mean().item()}
        if self.uses_anchor_loss:
            z1_tilde = z_t + (1 - t).unsqueeze(-1) * v
            ce = F.cross_entropy(self.head(z1_tilde, W), y)
            loss = loss + ce
            parts["ce"] = ce.item()
        parts["loss"] = loss.item()
        return loss, parts

    def integrate(self, x: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
        """z_1 from z_0 = z by `steps` Euler or Heun steps of size 1 / steps."""
        features = self.block.features(x)
        h = 1.0 / steps
        for k in range(steps):
            t = k * h
            v = self.velocity(features, z, t)
            if self.cfg.solver == "heun":
                v = 0.5 * (v + self.velocity(features, z + h * v, t + h))
            z = z + h * v
        return z

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """Nearest-embedding scores of z_1; z_0 = 0 (noise None) or noise[0]. Takes no labels."""
        W = self.embedding.weight
        z1 = self.integrate(x, start_state(x, W, noise), steps or self.cfg.steps)
        return nearest_embedding_proba(z1, W)
