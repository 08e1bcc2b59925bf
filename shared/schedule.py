"""The noise schedules as objects: NoProp-DT's fixed cosine schedule and NoProp-CT's learned one.

Indexing follows NOPROP_SPEC.md section 1: blocks t = 1..T, latents z_0..z_T, and the signal level
alpha_bar_t *increases* with t (z_0 is noise, z_T is almost the label embedding). Every coefficient the
trainer and the inference chain need is derived here once, in float64, and handed out as float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def posterior_step(coefficients, u_hat: torch.Tensor, z_prev: torch.Tensor,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """z' = a u_hat + b z_prev + sqrt(c) eps, for coefficients (a, b, c) (floats, or a [3] row of a
    step_coefficients table); eps = 0 when noise is None. The one step every sampler here takes: NoProp-DT's
    chain (CosineSchedule.step), NoProp-CT's DDIM and stochastic steps."""
    a, b, c = coefficients
    z = a * u_hat + b * z_prev
    if noise is not None:
        z = z + c**0.5 * noise
    return z


@dataclass(frozen=True)
class CosineSchedule:
    """Time-reversed Nichol-Dhariwal cosine schedule for NoProp-DT.

    alpha_bar_t = f(T - t) / f(0), f(tau) = cos^2(((tau / T + s) / (1 + s)) * pi / 2), clipped into
    [clip, 1 - clip]. The clip fixes SNR(T) and so the weight of the last block's loss; it is a recorded
    hyperparameter, as is the optional cap on the per-block SNR increment.
    """

    T: int = 10
    s: float = 0.008
    clip: float = 1e-4
    max_delta_snr: float | None = None
    _alpha_bar: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ValueError(f"T must be at least 1, got {self.T}")
        if not 0.0 < self.clip < 0.5:
            raise ValueError(f"clip must lie in (0, 0.5), got {self.clip}")
        if self.max_delta_snr is not None and self.max_delta_snr <= 0:
            raise ValueError(f"max_delta_snr must be positive, got {self.max_delta_snr}")

        def f(tau: float) -> float:
            return math.cos(((tau / self.T + self.s) / (1 + self.s)) * math.pi / 2) ** 2

        raw = [f(self.T - t) / f(0) for t in range(self.T + 1)]
        clipped = tuple(min(max(a, self.clip), 1.0 - self.clip) for a in raw)
        object.__setattr__(self, "_alpha_bar", clipped)

    # -- per-index quantities (float64 python floats; index t in 0..T) ---------------------------------
    def alpha_bar_at(self, t: int) -> float:
        return self._alpha_bar[t]

    def snr_at(self, t: int) -> float:
        a = self._alpha_bar[t]
        return a / (1.0 - a)

    def delta_snr_at(self, t: int) -> float:
        """SNR(t) - SNR(t-1) for t = 1..T, capped at max_delta_snr when set."""
        self._check_block(t)
        d = self.snr_at(t) - self.snr_at(t - 1)
        return d if self.max_delta_snr is None else min(d, self.max_delta_snr)

    def step_coefficients_at(self, t: int) -> tuple[float, float, float]:
        """(a_t, b_t, c_t) of q(z_t | z_{t-1}, y) = N(a_t u_y + b_t z_{t-1}, c_t I), t = 1..T.

        alpha_{t-1} := alpha_bar_{t-1} / alpha_bar_t (the index the paper's recursion implies).
        """
        self._check_block(t)
        ab_t, ab_prev = self._alpha_bar[t], self._alpha_bar[t - 1]
        alpha_prev = ab_prev / ab_t
        a = math.sqrt(ab_t) * (1.0 - alpha_prev) / (1.0 - ab_prev)
        b = math.sqrt(alpha_prev) * (1.0 - ab_t) / (1.0 - ab_prev)
        c = (1.0 - ab_t) * (1.0 - alpha_prev) / (1.0 - ab_prev)
        return a, b, c

    # -- whole-schedule tensors (float32) --------------------------------------------------------------
    @property
    def alpha_bar(self) -> torch.Tensor:
        """[T + 1] tensor alpha_bar_0..alpha_bar_T."""
        return torch.tensor(self._alpha_bar, dtype=torch.float64).float()

    @property
    def snr(self) -> torch.Tensor:
        return torch.tensor([self.snr_at(t) for t in range(self.T + 1)], dtype=torch.float64).float()

    @property
    def delta_snr(self) -> torch.Tensor:
        """[T] tensor, entry t - 1 holds SNR(t) - SNR(t-1) (capped if configured)."""
        return torch.tensor([self.delta_snr_at(t) for t in range(1, self.T + 1)], dtype=torch.float64).float()

    @property
    def step_coefficients(self) -> torch.Tensor:
        """[T, 3] tensor; row t - 1 holds (a_t, b_t, c_t)."""
        rows = [self.step_coefficients_at(t) for t in range(1, self.T + 1)]
        return torch.tensor(rows, dtype=torch.float64).float()

    # -- sampling --------------------------------------------------------------------------------------
    def sample_marginal(
        self, u: torch.Tensor, t: int, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z_t ~ q(z_t | y) = N(sqrt(alpha_bar_t) u_y, (1 - alpha_bar_t) I), by reparameterisation."""
        if not 0 <= t <= self.T:
            raise ValueError(f"t must lie in 0..{self.T}, got {t}")
        if noise is None:
            device = generator.device if generator is not None else u.device
            noise = torch.randn(u.shape, generator=generator, device=device, dtype=u.dtype).to(u.device)
        ab = self._alpha_bar[t]
        return math.sqrt(ab) * u + math.sqrt(1.0 - ab) * noise

    def step(
        self, t: int, u_hat: torch.Tensor, z_prev: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One inference step z_t = a_t u_hat + b_t z_{t-1} + sqrt(c_t) eps (eps = 0 when noise is None)."""
        return posterior_step(self.step_coefficients_at(t), u_hat, z_prev, noise)

    def kl_prior(self, u: torch.Tensor) -> torch.Tensor:
        """KL(q(z_0 | y) || N(0, I)) per example, for embeddings u of shape [N, d]."""
        ab0 = self._alpha_bar[0]
        d = u.shape[-1]
        return 0.5 * (ab0 * u.pow(2).sum(-1) - d * ab0 - d * math.log(1.0 - ab0))

    def to_config(self) -> dict[str, float | int | None]:
        return {"T": self.T, "s": self.s, "clip": self.clip, "max_delta_snr": self.max_delta_snr}

    def _check_block(self, t: int) -> None:
        if not 1 <= t <= self.T:
            raise ValueError(f"block index t must lie in 1..{self.T}, got {t}")


# -- NoProp-CT: the learned schedule of the paper's Appendix B --------------------------------------------


class LearnedNoiseSchedule(nn.Module):
    """alpha_bar(t) = sigmoid(-gamma(t)), SNR(t) = exp(-gamma(t)) on t in [0, 1], trained with the model.

    gamma(t) = gamma0 + (gamma1 - gamma0)(1 - gamma_bar(t)) (paper Eq. 67), so gamma(0) = gamma1 (the noise
    end) and gamma(1) = gamma0 (the label end). gamma_bar(t) = (g(t) - g(0)) / (g(1) - g(0)) where
    g(t) = a t + sum_k w2_k sigmoid(w1_k t + b_k) has positive a, w1, w2 (softplus of free parameters), so
    gamma_bar rises from 0 to 1. gamma1 = gamma0 + softplus(gap) keeps gamma1 > gamma0: gamma then falls
    and SNR rises in t for every parameter value, which the L2 weight SNR'(t) > 0 relies on.
    """

    def __init__(self, gamma0: float = -5.0, gamma1: float = 5.0, hidden: int = 64):
        super().__init__()
        if not gamma1 > gamma0:
            raise ValueError(f"gamma1 (noise end) must exceed gamma0 (label end), got {gamma0}, {gamma1}")
        self.gamma0 = nn.Parameter(torch.tensor(float(gamma0)))
        gap = gamma1 - gamma0
        # inverse softplus, so that softplus(gap_raw) = gap exactly (no overflow for big gaps)
        self.gap_raw = nn.Parameter(torch.tensor(gap + math.log(-math.expm1(-gap))))
        self.linear_raw = nn.Parameter(torch.tensor(0.0))
        self.w1_raw = nn.Parameter(torch.randn(hidden))
        self.b1 = nn.Parameter(torch.randn(hidden))
        self.w2_raw = nn.Parameter(torch.randn(hidden) - 2.0)

    @property
    def gamma1(self) -> torch.Tensor:
        return self.gamma0 + F.softplus(self.gap_raw)

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(t) and g'(t) (closed form) for t of any shape."""
        a, w1, w2 = F.softplus(self.linear_raw), F.softplus(self.w1_raw), F.softplus(self.w2_raw)
        s = torch.sigmoid(t.unsqueeze(-1) * w1 + self.b1)
        g = a * t + (w2 * s).sum(-1)
        dg = a + (w2 * w1 * s * (1 - s)).sum(-1)
        return g, dg

    def gamma_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma(t) and d gamma / dt, both differentiable in the schedule's parameters."""
        g, dg = self._g(t)
        ends, _ = self._g(torch.tensor([0.0, 1.0], device=t.device, dtype=t.dtype))
        span = ends[1] - ends[0]
        gamma_bar = (g - ends[0]) / span
        width = self.gamma1 - self.gamma0
        return self.gamma0 + width * (1 - gamma_bar), -width * dg / span

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_and_derivative(t)[0]

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """SNR'(t) = -gamma'(t) exp(-gamma(t)) in closed form; positive because gamma falls."""
        gamma, dgamma = self.gamma_and_derivative(t)
        return -dgamma * torch.exp(-gamma)

    def log_snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """d log SNR / dt = -gamma'(t); positive because gamma falls."""
        return -self.gamma_and_derivative(t)[1]

    def sample_marginal(self, u: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """z_t ~ N(sqrt(alpha_bar(t)) u, (1 - alpha_bar(t)) I) for per-example times t [N]; differentiable."""
        if noise is None:
            noise = torch.randn(u.shape, generator=generator).to(u.device, u.dtype)
        ab = self.alpha_bar(t).unsqueeze(-1)
        return ab.sqrt() * u + (1 - ab).sqrt() * noise

    def kl_prior(self, u: torch.Tensor) -> torch.Tensor:
        """KL(q(z_0 | y) || N(0, I)) per example, with alpha_bar(0) of the current schedule."""
        ab0 = self.alpha_bar(torch.zeros((), device=u.device, dtype=u.dtype))
        d = u.shape[-1]
        return 0.5 * (ab0 * u.pow(2).sum(-1) - d * ab0 - d * torch.log1p(-ab0))

    @torch.no_grad()
    def step_coefficients(self, steps: int, mode: str = "deterministic") -> torch.Tensor:
        """[steps, 3] rows (a, b, c): one step from t_k = k / steps to t_{k+1} is z' = a u_hat + b z + sqrt(c) eps.

        'deterministic' is the DDIM step (probability flow, c = 0): keep the noise direction implied by
        (z, u_hat) and move to the next noise level. 'stochastic' samples q(z_{t'} | z_t, u = u_hat), the
        continuous form of the DT step. Both are linear in (u_hat, z), so an unrolled graph needs only
        these constants; the network is evaluated at t_k.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if mode not in ("deterministic", "stochastic"):
            raise ValueError(f"mode must be deterministic or stochastic, got {mode!r}")
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        ab = self.alpha_bar(grid.to(self.gamma0.dtype)).double()
        ab_s, ab_t = ab[:-1], ab[1:]
        if mode == "deterministic":
            b = ((1 - ab_t) / (1 - ab_s)).sqrt()
            a = ab_t.sqrt() - b * ab_s.sqrt()
            c = torch.zeros_like(a)
        else:
            alpha = ab_s / ab_t
            a = ab_t.sqrt() * (1 - alpha) / (1 - ab_s)
            b = alpha.sqrt() * (1 - ab_t) / (1 - ab_s)
            c = (1 - ab_t) * (1 - alpha) / (1 - ab_s)
        return torch.stack([a, b, c], dim=1).float()

    def to_config(self) -> dict[str, float]:
        return {"kind": "learned", "gamma0": float(self.gamma0), "gamma1": float(self.gamma1)}
