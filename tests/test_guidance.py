"""The distillation gradients, checked against the published formulas computed independently."""

import pytest
import torch

from trainers.config_base import ConfigError, build_config
from trainers.guidance import GuidanceConfig, asd_timestep_shift, distillation_grad

T = 1000


def alphas():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2  # SD's scaled_linear
    return torch.cumprod(1 - betas, 0).float()


class CountingEps:
    """A fake prior with distinct conditional / unconditional behaviour that records its calls."""

    def __init__(self):
        self.calls = []

    def cond_pred(self, x, t):
        return torch.tanh(x) * 0.5 + t.view(-1, 1, 1, 1) / T

    def uncond_pred(self, x, t):
        return -0.3 * x + 0.1 * torch.sin(t.view(-1, 1, 1, 1).float())

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.shape[0], t.clone(), cond.clone()))
        c = cond.view(-1, 1, 1, 1)
        return torch.where(c, self.cond_pred(x_t, t), self.uncond_pred(x_t, t))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([20, 500, 980])
    return x0, noise, t


def noisy(a, x0, noise, t):
    # Independent of the module: the forward process written out per sample.
    return torch.stack(
        [a[ti].sqrt() * x + (1 - a[ti]).sqrt() * n for x, n, ti in zip(x0, noise, t, strict=True)]
    )


def test_sds_gradient_is_weighted_cfg_prediction_minus_noise(batch):
    x0, noise, t = batch
    a, eps, s = alphas(), CountingEps(), 7.5
    grad = distillation_grad("sds", eps, a, x0, t, noise, cfg_scale=s)
    x_t = noisy(a, x0, noise, t)
    cfg = eps.uncond_pred(x_t, t) + s * (eps.cond_pred(x_t, t) - eps.uncond_pred(x_t, t))
    expected = (1 - a[t]).view(-1, 1, 1, 1) * (cfg - noise)
    torch.testing.assert_close(grad, expected)
    assert len(eps.calls) == 1 and eps.calls[0][0] == 6


def test_csd_gradient_is_weighted_classifier_score(batch):
    x0, noise, t = batch
    a, eps, s = alphas(), CountingEps(), 5.0
    grad = distillation_grad("csd", eps, a, x0, t, noise, cfg_scale=s)
    x_t = noisy(a, x0, noise, t)
    expected = (1 - a[t]).view(-1, 1, 1, 1) * s * (eps.cond_pred(x_t, t) - eps.uncond_pred(x_t, t))
    torch.testing.assert_close(grad, expected)
    assert len(eps.calls) == 1


def test_asd_gradient_uses_same_noise_at_shifted_timestep_in_one_forward(batch):
    x0, noise, t = batch
    a, eps, s = alphas(), CountingEps(), 7.5
    t_plus = torch.tensor([25, 540, 999])
    grad = distillation_grad("asd", eps, a, x0, t, noise, cfg_scale=s, t_plus=t_plus)
    x_t, x_tp = noisy(a, x0, noise, t), noisy(a, x0, noise, t_plus)
    cfg = eps.uncond_pred(x_t, t) + s * (eps.cond_pred(x_t, t) - eps.uncond_pred(x_t, t))
    expected = (1 - a[t]).view(-1, 1, 1, 1) * (cfg - eps.cond_pred(x_tp, t_plus))
    torch.testing.assert_close(grad, expected)
    ((n, ts, cond),) = eps.calls
    assert n == 9  # 3 × batch in a single forward
    assert cond.tolist() == [False] * 3 + [True] * 6  # the shifted prediction is conditional only
    assert ts[6:].tolist() == t_plus.tolist()


def test_asd_with_zero_shift_equals_sds_minus_conditional_noise_gap(batch):
    # With Δt = 0 ASD's second term is ε_cond(x_t, t): the gradient is w·(s−1)·(ε_cond − ε_uncond).
    x0, noise, t = batch
    a, eps = alphas(), CountingEps()
    asd = distillation_grad("asd", eps, a, x0, t, noise, cfg_scale=7.5, t_plus=t)
    csd = distillation_grad("csd", eps, a, x0, t, noise, cfg_scale=6.5)
    torch.testing.assert_close(asd, csd)


def test_asd_needs_t_plus_and_unknown_methods_are_refused(batch):
    x0, noise, t = batch
    with pytest.raises(ValueError, match="t_plus"):
        distillation_grad("asd", CountingEps(), alphas(), x0, t, noise, cfg_scale=7.5)
    with pytest.raises(ValueError, match="method"):
        distillation_grad("vsd", CountingEps(), alphas(), x0, t, noise, cfg_scale=7.5)


def test_timestep_shift_lies_in_paper_interval_and_is_clamped():
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(20, 981, (5000,), generator=gen)
    t_plus = asd_timestep_shift(t, 20, 0.1, T, generator=gen)
    shift = t_plus - t
    assert (shift >= 0).all()
    assert (shift <= (0.1 * (t - 20)).floor().long()).all()
    assert shift.float().mean() > 0.5 * (0.1 * (t - 20).float()).mean() * 0.8  # uniform: mean ≈ half the max
    assert t_plus.max() <= T - 1 and t_plus.min() >= 1


def test_deterministic_shift_is_eta_times_distance_to_t_min_capped_at_T_minus_1():
    t = torch.tensor([20, 120, 520, 990])
    t_plus = asd_timestep_shift(t, 20, 0.1, T, random=False)
    assert t_plus.tolist() == [20, 130, 570, 999]
    big = asd_timestep_shift(torch.tensor([900]), 20, 1.0, T, random=False)
    assert big.tolist() == [999]


def test_timestep_shift_is_reproducible_from_the_generator():
    t = torch.arange(20, 980, 7)
    first = asd_timestep_shift(t, 20, 0.3, T, generator=torch.Generator().manual_seed(3))
    second = asd_timestep_shift(t, 20, 0.3, T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="eta"):
        asd_timestep_shift(t, 20, -0.1, T)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"t_min": 0.6, "t_max": 0.5}, "guidance.t_min"),
        ({"eta": -0.1}, "guidance.eta"),
        ({"cfg_scale": -1}, "guidance.cfg_scale"),
        ({"t_max": 1.5}, "guidance.t_max"),
        ({"t_max": [0.98, 0.5, 0, 100], "t_min": 0.6}, "guidance.t_min"),
        ({"t_min": [0.1, 0.2, 0]}, "guidance.t_min"),
    ],
)
def test_bad_guidance_settings_are_refused_naming_the_field(fields, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config(GuidanceConfig, fields, where="guidance")


def test_annealed_timestep_range_is_accepted_when_ordered_throughout():
    cfg = build_config(GuidanceConfig, {"t_max": [0.98, 0.5, 0, 1000], "t_min": 0.02})
    assert cfg.t_max == [0.98, 0.5, 0, 1000]
