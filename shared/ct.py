"""NoProp-CT: one time-conditioned denoiser u_hat(z_t, x, t) and a noise schedule learned with it.

Training (the paper's Algorithm 2, Eq. 9) draws t ~ U(0, 1) per example and z_t ~ q(z_t | y) in closed
form, so no step ever runs the network twice: loss = CE(head(z_1 ~ q), y) + KL(q(z_0 | y) || N(0, I))
+ (eta / 2) SNR'(t) ||u_hat(z_t, x, t) - u_y||^2. Inference starts at t = 0 and takes `steps` steps of
the schedule (DDIM-style, or the stochastic posterior step) to t = 1, where the head reads z_1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noprop.continuous import ContinuousPredictor, start_state
from noprop.model_configs import CTConfig
from noprop.schedule import LearnedNoiseSchedule, posterior_step


class NoPropCT(ContinuousPredictor, nn.Module):
    """State dict: embedding.weight, block.* (the one network), schedule.* (the learned gamma), head.*."""

    def __init__(self, cfg: CTConfig, embedding_init: torch.Tensor | None = None):
        super().__init__()
        self.build_shared_parts(cfg, embedding_init)
        self.schedule = LearnedNoiseSchedule(cfg.gamma0, cfg.gamma1)
        self.head.init_nearest_embedding(self.embedding.weight)

    def denoise(self, features: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """u_hat = softmax(logits) . W: a convex combination of class embeddings."""
        return F.softmax(self.block.logits(features, z, t), dim=1) @ self.embedding.weight

    def loss(self, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 9 averaged over the batch; one t per example. Gradients reach the network, head, W and schedule.

        With l2_weight "log-snr" the L2 term is weighted by -gamma'(t) instead of SNR'(t) (not Eq. 9)."""
        W = self.embedding.weight
        u = W[y]
        t = torch.rand(len(y), generator=generator).to(x.device, x.dtype)
        z_t = self.schedule.sample_marginal(u, t, generator=generator)
        l2 = (self.denoise(self.block.features(x), z_t, t) - u).pow(2).sum(dim=1)
        if self.cfg.l2_weight == "snr":
            weight = 0.5 * self.cfg.eta * self.schedule.snr_derivative(t)
        else:
            weight = 0.5 * self.cfg.eta * self.schedule.log_snr_derivative(t)
        z_1 = self.schedule.sample_marginal(u, torch.ones_like(t), generator=generator)
        ce = F.cross_entropy(self.head(z_1, W), y, reduction="none")
        kl = self.schedule.kl_prior(u)
        loss = (ce + kl + weight * l2).mean()
        parts = {"loss": loss.item(), "l2": l2.mean().item(), "ce": ce.mean().item(),
                 "gamma0": self.schedule.gamma0.item(), "gamma1": self.schedule.gamma1.item()}
        return loss, parts

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """Class probabilities from z_1 after `steps` steps from t = 0; takes no labels.

        noise None: z_0 = 0 and DDIM steps (deterministic); noise [steps + 1, N, d]: z_0 = noise[0] and the
        stochastic posterior step with noise[k + 1].
        """
        steps = steps or self.cfg.steps
        W = self.embedding.weight
        coef = self.schedule.step_coefficients(steps, "deterministic" if noise is None else "stochastic")
        coef = coef.to(x.device, x.dtype)
        features = self.block.features(x)
        z = start_state(x, W, noise)
        for k in range(steps):
            u_hat = self.denoise(features, z, k / steps)
            z = posterior_step(coef[k], u_hat, z, None if noise is None else noise[k + 1])
        return F.softmax(self.head(z, W), dim=1)
