"""The NoProp-DT noise schedule as one object.

Indexing follows NOPROP_SPEC.md section 1: blocks t = 1..T, latents z_0..z_T, and the signal level
alpha_bar_t *increases* with t (z_0 is noise, z_T is almost the label embedding). Every coefficient the
trainer and the inference chain need is derived here once, in float64, and handed out as float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
        a, b, c = self.step_coefficients_at(t)
        z = a * u_hat + b * z_prev
        if noise is not None:
            z = z + math.sqrt(c) * noise
        return z

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
