"""The schedule's identities (NOPROP_SPEC.md section 1) and the mistakes of section 6 (items 1 and 5)."""

import math

import pytest
import torch

from noprop.schedule import CosineSchedule


@pytest.mark.parametrize("T", [1, 3, 10, 50])
def test_alpha_bar_increases_and_every_delta_snr_is_positive(T):
    s = CosineSchedule(T=T)
    ab = [s.alpha_bar_at(t) for t in range(T + 1)]
    assert all(b > a for a, b in zip(ab, ab[1:])), "alpha_bar must increase in t (z_0 noise, z_T label)"
    assert all(s.delta_snr_at(t) > 0 for t in range(1, T + 1))
    assert (s.delta_snr > 0).all()


def test_endpoints_follow_the_clip_and_match_the_spec_values():
    s = CosineSchedule(T=10, clip=1e-4)
    assert s.alpha_bar_at(0) == pytest.approx(1e-4)
    assert s.alpha_bar_at(10) == pytest.approx(1 - 1e-4)
    spec = [0.0001, .024, .094, .203, .341, .494, .647, .787, .899, .972, .9999]
    assert [round(s.alpha_bar_at(t), 3) for t in range(11)] == pytest.approx(spec, abs=1.5e-3)
    # the clip sets SNR(T) and so the last block's weight: about 1e4 against <= 26 for the others
    assert s.delta_snr_at(10) == pytest.approx(1e4, rel=0.01)
    assert max(s.delta_snr_at(t) for t in range(1, 10)) < 26
    looser = CosineSchedule(T=10, clip=1e-2)
    assert looser.delta_snr_at(10) < 70
    capped = CosineSchedule(T=10, max_delta_snr=50.0)
    assert capped.delta_snr_at(10) == 50.0 and capped.delta_snr_at(3) == s.delta_snr_at(3)


@pytest.mark.parametrize("T", [2, 10, 25])
def test_step_coefficients_chain_onto_the_marginal(T):
    s = CosineSchedule(T=T)
    for t in range(1, T + 1):
        a, b, c = s.step_coefficients_at(t)
        ab_t, ab_prev = s.alpha_bar_at(t), s.alpha_bar_at(t - 1)
        assert a + b * math.sqrt(ab_prev) == pytest.approx(math.sqrt(ab_t), abs=1e-12)
        assert b**2 * (1 - ab_prev) + c == pytest.approx(1 - ab_t, abs=1e-12)
        assert c > 0 and a > 0 and b > 0


def test_alpha_index_uses_alpha_bar_ratio_not_alpha_bar_itself():
    # alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t: a_t for t = 1 is then sqrt(ab_1)(1 - ab_0/ab_1)/(1 - ab_0)
    s = CosineSchedule(T=10)
    ab0, ab1 = s.alpha_bar_at(0), s.alpha_bar_at(1)
    a1, b1, c1 = s.step_coefficients_at(1)
    assert a1 == pytest.approx(math.sqrt(ab1) * (1 - ab0 / ab1) / (1 - ab0))
    assert b1 == pytest.approx(math.sqrt(ab0 / ab1) * (1 - ab1) / (1 - ab0))


def test_marginal_uses_sqrt_alpha_bar():
    s = CosineSchedule(T=10)
    u = torch.ones(1, 4)
    z = s.sample_marginal(u, 3, noise=torch.zeros(1, 4))
    assert torch.allclose(z, torch.full((1, 4), math.sqrt(s.alpha_bar_at(3))))


def test_monte_carlo_chaining_step_onto_marginal_gives_the_next_marginal():
    s = CosineSchedule(T=10)
    g = torch.Generator().manual_seed(1)
    n, d = 200_000, 3
    u = torch.tensor([[1.5, -0.5, 0.25]]).expand(n, d)
    for t in (1, 4, 10):
        z_prev = s.sample_marginal(u, t - 1, generator=g)
        a, b, c = s.step_coefficients_at(t)
        z_t = a * u + b * z_prev + math.sqrt(c) * torch.randn(n, d, generator=g)
        mean_expected = math.sqrt(s.alpha_bar_at(t)) * u[0]
        var_expected = 1 - s.alpha_bar_at(t)
        assert torch.allclose(z_t.mean(0), mean_expected, atol=0.01)
        assert torch.allclose(z_t.var(0), torch.full((d,), var_expected), rtol=0.02, atol=2e-4)


def test_kl_prior_matches_the_closed_form():
    s = CosineSchedule(T=10)
    u = torch.randn(5, 7)
    ab0 = s.alpha_bar_at(0)
    # KL(N(m, v I) || N(0, I)) = 0.5 (v d + |m|^2 - d - d ln v), m = sqrt(ab0) u, v = 1 - ab0
    m2 = ab0 * u.pow(2).sum(1)
    expected = 0.5 * ((1 - ab0) * 7 + m2 - 7 - 7 * math.log(1 - ab0))
    assert torch.allclose(s.kl_prior(u), expected, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"T": 0}, {"clip": 0.0}, {"clip": 0.7}, {"max_delta_snr": -1.0}])
def test_bad_schedule_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        CosineSchedule(**kwargs)


def test_every_sampler_steps_through_the_schedule(monkeypatch):
    """One posterior step, in one place: NoProp-DT's chain takes CosineSchedule.step once per block (t = 1..T,
    its noise eps_t, or none), and NoProp-CT's forward takes posterior_step once per integration step, with the
    schedule's own coefficient rows."""
    from noprop import ct as ct_module
    from noprop.methods import build_model, model_config
    from noprop.model import NoPropDT
    from noprop.model_configs import NoPropConfig

    cfg = NoPropConfig(input_shape=(1, 12, 12), num_classes=4, T=3, channels=(4, 8, 8), hidden=16, dropout=0.0)
    model = NoPropDT(cfg).eval()
    x, noise = torch.rand(5, 1, 12, 12), torch.randn(4, 5, 4)
    seen, real_step = [], CosineSchedule.step

    def step(self, t, u_hat, z_prev, eps=None):
        seen.append((t, eps is None or bool(torch.equal(eps, noise[t]))))
        return real_step(self, t, u_hat, z_prev, eps)

    monkeypatch.setattr(CosineSchedule, "step", step)
    with torch.no_grad():
        model.chain(x)
        assert seen == [(1, True), (2, True), (3, True)]
        seen.clear()
        model.chain(x, noise)
    assert seen == [(1, True), (2, True), (3, True)]

    ct = build_model("ct", model_config("ct", (1, 12, 12), 4, channels=(4, 8, 8), hidden=16, dropout=0.0,
                                        steps=4)).eval()
    rows, real_posterior = [], ct_module.posterior_step

    def posterior(coefficients, u_hat, z_prev, eps=None):
        rows.append(coefficients.clone())
        return real_posterior(coefficients, u_hat, z_prev, eps)

    monkeypatch.setattr(ct_module, "posterior_step", posterior)
    with torch.no_grad():
        ct(x, torch.randn(5, 5, 4))
    assert torch.equal(torch.stack(rows), ct.schedule.step_coefficients(4, "stochastic"))
