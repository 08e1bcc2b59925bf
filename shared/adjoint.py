"""The adjoint-sensitivity baseline: a neural ODE over NoProp-CT's block, trained end to end.

dz/dt = u_hat(z, x, t) - z with u_hat = softmax(logits) . W from the same time-conditioned block as
NoProp-CT: the continuous limit of the backprop chain's z_t = (1 - a) z_{t-1} + a u_hat_t (Eq. 18).
z_0 ~ N(0, I) in training, z_0 = 0 for deterministic prediction; one cross-entropy on head(z_1). Gradients
come from torchdiffeq's odeint_adjoint, which solves the adjoint ODE backwards instead of storing the
forward pass, so memory does not grow with the number of steps (the paper's comparison point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from noprop.continuous import ContinuousPredictor, TimeConditionedBlock, start_state
from noprop.model_configs import AdjointConfig


class _Dynamics(nn.Module):
    """f(t, (z, features)) = (u_hat(z, x, t) - z, 0): x's features ride along as constant state, so the conv
    path runs once per batch and its gradient arrives as the adjoint of that state at t = 0."""

    def __init__(self, block: TimeConditionedBlock, embedding: nn.Parameter):
        super().__init__()
        self.block = block
        self.embedding = embedding

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, features = state
        u_hat = F.softmax(self.block.logits(features, z, t), dim=1) @ self.embedding
        return u_hat - z, torch.zeros_like(features)


class AdjointODE(ContinuousPredictor, nn.Module):
    """State dict: embedding.weight, block.*, head.* (the same keys as NoProp-CT less the schedule)."""

    def __init__(self, cfg: AdjointConfig, embedding_init: torch.Tensor | None = None):
        super().__init__()
        self.build_shared_parts(cfg, embedding_init)

    def solve(self, x: torch.Tensor, z0: torch.Tensor, steps: int, adjoint: bool) -> torch.Tensor:
        """z_1 from z_0 by `steps` fixed steps; adjoint=True for training gradients by the adjoint method."""
        W = self.embedding.weight
        dynamics = _Dynamics(self.block, W)
        grid = torch.tensor([0.0, 1.0], device=x.device, dtype=x.dtype)
        state = (z0, self.block.features(x))
        options = {"step_size": 1.0 / steps}
        if adjoint:
            params = [p for name, p in self.block.named_parameters() if not name.startswith("x_path.")]
            if W.requires_grad:
                params.append(W)
            z, _ = odeint_adjoint(dynamics, state, grid, method=self.cfg.solver, options=options,
                                  adjoint_params=tuple(params), adjoint_method=self.cfg.solver,
                                  adjoint_options=options)
        else:  # no adjoint state needed: z alone is the state (torchdiffeq would flatten a tuple with fixed sizes)
            features = state[1]
            z = odeint(lambda t, z: dynamics(t, (z, features))[0], z0, grid, method=self.cfg.solver, options=options)
        return z[-1]

    def loss(self, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.embedding.weight.shape[1]
        z0 = torch.randn(len(y), d, generator=generator).to(x.device, x.dtype)
        z1 = self.solve(x, z0, self.cfg.steps, adjoint=True)
        loss = F.cross_entropy(self.head(z1, self.embedding.weight), y)
        return loss, {"loss": loss.item()}

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """Class probabilities of the head at z_1; z_0 = 0 (noise None) or noise[0] (the ODE adds no noise)."""
        W = self.embedding.weight
        z1 = self.solve(x, start_state(x, W, noise), steps or self.cfg.steps, adjoint=False)
        return F.softmax(self.head(z1, W), dim=1)
