"""Samplers against exact fields: with the true velocity / noise prediction of a Gaussian (or a
Gaussian mixture) the samplers must reproduce the target's mean and covariance.

Tolerances, on every entry of the mean vector and of the covariance matrix:
* ODE samplers (Euler, Heun) get *whitened* noise (sample mean 0, sample covariance I). For a
  Gaussian target the sampler is then an affine map, so the output moments carry no Monte Carlo
  error at all: what remains is the discretisation error, bounded at 0.03 for Euler with 100
  steps and 0.006 for Heun with 20 steps, and the error must shrink at first (Euler) and second
  (Heun) order when the steps double.
  DDIM (eta = 0) likewise: below 0.02 with 200 steps, first order.
* Stochastic samplers (Euler-Maruyama, DDPM ancestral) use 8192-16384 samples in 2-4 dimensions; every
  mean and covariance entry must lie within 4 of its Monte Carlo standard errors of the target
  (``sqrt(S_ii / N)`` for a mean, ``sqrt((S_ii S_jj + S_ij^2) / N)`` for a covariance entry;
  at most 0.011 and 0.015 here).
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from selfalign.objectives import DDPMObjective, ObjectiveConfig, build_objective
from selfalign.sampling import GuidedModel, SamplerConfig, sample

N_STOCHASTIC = 16384
STANDARD_ERRORS = 4.0
MEANS = torch.tensor([[1.0, -0.5, 0.3], [-1.0, 0.5, 0.0], [0.2, 0.1, -0.2]])   # classes 0, 1, null
_A = torch.tensor([[0.8, 0.3, 0.0], [0.0, 0.6, 0.2], [0.1, 0.0, 0.5]])
COV = _A @ _A.T                                                                # full covariance
MEANS4 = torch.tensor([[1.0, -0.5, 0.3, 0.8], [-1.0, 0.5, 0.0, -0.4], [0.2, 0.1, -0.2, 0.1]])
COV4_DIAG = torch.diag(torch.tensor([0.25, 0.5, 0.9, 0.4]))                      # DDPM: diagonal


# Thousands of tiny ops: threading only adds overhead on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def linear_alphas_cumprod() -> torch.Tensor:
    """DDPM's linear schedule, recomputed here in float64 (not taken from the code under test)."""
    return torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))


class GaussianField(nn.Module):
    """The exact network output for data ``x0 | y ~ N(means[y], cov)``, with the backbone's call
    signature ``(x, t, y)``. Flow: the velocity ``E[d x_t/dt | x_t]``. DDPM: ``E[eps | x_t]`` and,
    with ``chain``, the learned-range value that makes each reverse step of that (respaced)
    chain exact (cov must be diagonal, variances <= 1). Records every call."""

    def __init__(self, objective, means, cov, channels, chain=None, learn_sigma=True):
        super().__init__()
        self.objective, self.channels, self.chain, self.learn_sigma = objective, channels, chain, learn_sigma
        self.means = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(cov)
        self.variances = torch.diagonal(cov)
        self.config = types.SimpleNamespace(num_classes=self.means.shape[0] - 1)
        self.abar = linear_alphas_cumprod()
        self.calls = []

    def coefficients(self, t):
        if self.objective.kind == "flow":
            return self.objective.coefficients(t)
        abar = self.abar[t.long()]
        return abar.sqrt(), (1 - abar).sqrt(), None, None

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.detach().clone(), y.clone()))
        z = x.reshape(x.shape[0], -1).double()
        a, s, da, ds = self.coefficients(t.double())
        a, s = a[:, None], s[:, None]
        mu, lam, u = self.means[y], self.eigenvalues, self.eigenvectors
        solved = ((z - a * mu) @ u / (a ** 2 * lam + s ** 2)) @ u.T     # (a^2 S + s^2 I)^-1 (x - a mu)
        eps = s * solved
        x0 = mu + a * ((solved @ u) * lam) @ u.T
        if self.objective.kind == "flow":
            out = da[:, None] * x0 + ds[:, None] * eps
        else:
            out = torch.cat([eps, self.learned_range(t.long())], 1) if self.learn_sigma else eps
        return out.reshape(x.shape[0], -1, 1, 1).to(x.dtype)

    def learned_range(self, t_original):
        kept = self.chain.timestep_map
        i = torch.searchsorted(kept, t_original)
        abar = self.abar[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        beta = (1 - abar / abar_prev)[i, None]
        posterior = (1 - abar / abar_prev) * (1 - abar_prev) / (1 - abar)
        log_low = torch.cat([posterior[1:2], posterior[1:]]).log()[i, None]
        # exact Var(x_{t-1} | x_t) per dimension for Gaussian data with variance v: V b / ((1-b) V + b)
        marginal_prev = abar_prev[i, None] * self.variances + 1 - abar_prev[i, None]
        reverse = marginal_prev * beta / ((1 - beta) * marginal_prev + beta)
        return 2 * (reverse.log() - log_low) / (beta.log() - log_low) - 1


def whitened_noise(n, dim, seed=0):
    z = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T.reshape(n, dim, 1, 1)


def moments(x):
    x = x.reshape(x.shape[0], -1).double()
    return x.mean(0), torch.cov(x.T)


def moment_error(x, mean, cov):
    m, c = moments(x)
    return max((m - mean).abs().max().item(), (c - cov).abs().max().item())


def standard_errors_off(x, mean, cov):
    """Largest deviation of the sample mean / covariance from the target, in standard errors."""
    n = x.shape[0]
    m, c = moments(x)
    mean, cov = mean.double(), cov.double()
    var = torch.diagonal(cov)
    mean_z = (m - mean).abs() / (var / n).sqrt()
    cov_z = (c - cov).abs() / ((torch.outer(var, var) + cov ** 2) / n).sqrt()
    return max(mean_z.max().item(), cov_z.max().item())


def labels(n, cls=0):
    return torch.full((n,), cls, dtype=torch.long)


# -- flow: ODE and SDE ---------------------------------------------------------------------
def ode_error(path, name, steps, cfg_scale=1.0, expected_mean=MEANS[0]):
    objective = build_objective(ObjectiveConfig(path=path))
    field = GaussianField(objective, MEANS, COV, 3)
    x = sample(field, objective, whitened_noise(4096, 3), labels(4096),
               SamplerConfig(name=name, steps=steps, cfg_scale=cfg_scale))
    return moment_error(x, expected_mean, COV)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_samplers_match_gaussian_and_converge_at_their_order(path):
    euler, euler_fine = ode_error(path, "euler", 50), ode_error(path, "euler", 100)
    heun, heun_fine = ode_error(path, "heun", 10), ode_error(path, "heun", 20)
    assert euler_fine < 0.03 and heun_fine < 0.006, (euler_fine, heun_fine)
    assert 1.6 < euler / euler_fine < 2.4, (euler, euler_fine)     # first order
    assert 3.0 < heun / heun_fine < 5.5, (heun, heun_fine)         # second order


@pytest.mark.parametrize("path,diffusion", [("linear", "2t"), ("cosine", "2t"), ("linear", "sigma")])
def test_euler_maruyama_matches_gaussian(path, diffusion):
    objective = build_objective(ObjectiveConfig(path=path))
    field = GaussianField(objective, MEANS, COV, 3)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(N_STOCHASTIC, 3, 1, 1, generator=gen)
    config = SamplerConfig(name="euler_maruyama", steps=250, diffusion=diffusion)
    x = sample(field, objective, noise, labels(N_STOCHASTIC), config, generator=gen)
    assert standard_errors_off(x, MEANS[0], COV) < STANDARD_ERRORS
    assert len(field.calls) == 250     # 249 stochastic steps on linspace(1, 0.04) + the last one


class MixtureVelocity(nn.Module):
    """Exact velocity (linear path) of a 2-component isotropic Gaussian mixture."""

    def __init__(self, objective, weights, means, variances):
        super().__init__()
        self.objective = objective
        self.log_w = torch.tensor(weights, dtype=torch.float64).log()
        self.means = torch.tensor(means, dtype=torch.float64)
        self.variances = torch.tensor(variances, dtype=torch.float64)
        self.config = types.SimpleNamespace(num_classes=1)

    def forward(self, x, t, y):
        z = x.reshape(x.shape[0], -1).double()
        a, s, da, ds = (c[:, None, None] for c in self.objective.coefficients(t.double()))
        var = a ** 2 * self.variances[None, :, None] + s ** 2                     # (B, K, 1)
        r = z[:, None] - a * self.means[None]                                     # (B, K, D)
        log_p = self.log_w - 0.5 * z.shape[1] * var[..., 0].log() - (r ** 2).sum(-1) / (2 * var[..., 0])
        w = log_p.softmax(-1)[..., None]
        x0 = self.means[None] + a * self.variances[None, :, None] / var * r
        eps = s / var * r
        return (w * (da * x0 + ds * eps)).sum(1).reshape(x.shape).to(x.dtype)


def test_heun_matches_gaussian_mixture():
    weights, means, variances = [0.3, 0.7], [[1.5, 0.5], [-1.0, -0.3]], [0.1, 0.2]
    objective = build_objective(ObjectiveConfig(path="linear"))
    field = MixtureVelocity(objective, weights, means, variances)
    noise = torch.randn(8192, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    x = sample(field, objective, noise, labels(8192), SamplerConfig(name="heun", steps=40))
    w, m, v = torch.tensor(weights, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), \
        torch.tensor(variances, dtype=torch.float64)
    mean = (w[:, None] * m).sum(0)
    cov = sum(w[k] * (v[k] * torch.eye(2, dtype=torch.float64) + torch.outer(m[k], m[k]))
              for k in range(2)) - torch.outer(mean, mean)
    assert standard_errors_off(x, mean, cov) < STANDARD_ERRORS
    first = ((x.reshape(-1, 2).double() - m[0]).norm(dim=1) < (x.reshape(-1, 2).double() - m[1]).norm(dim=1))
    assert abs(first.double().mean().item() - 0.3) < 0.02    # component weights kept


def test_guidance_extrapolates_the_class_mean_on_all_channels():
    # For Gaussians with a shared covariance, uncond + s (cond - uncond) is the exact field of
    # N(mu_null + s (mu_y - mu_null), cov): guided samples must have that mean.
    expected = MEANS[2] + 2.0 * (MEANS[0] - MEANS[2])
    assert ode_error("linear", "heun", 20, cfg_scale=2.0, expected_mean=expected) < 0.006


# -- DDPM and DDIM ---------------------------------------------------------------------------
def ddpm_run(config, means=MEANS4, cov=COV4_DIAG, cls=0, seed=3, n=N_STOCHASTIC):
    objective = DDPMObjective()
    chain = objective.respaced(config.respacing or str(config.steps))
    field = GaussianField(objective, means, cov, 4, chain=chain)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, 1, 1, generator=gen)
    return sample(field, objective, noise, labels(n, cls), config, generator=gen), field


@pytest.mark.parametrize("respacing", ["50", "ddim25"])
def test_ddpm_ancestral_with_learned_variance_matches_gaussian(respacing):
    x, field = ddpm_run(SamplerConfig(name="ddpm", respacing=respacing))
    assert standard_errors_off(x, MEANS4[0], COV4_DIAG) < STANDARD_ERRORS
    assert len(field.calls) == int(respacing.removeprefix("ddim"))


def test_ddim_matches_gaussian_and_converges_at_first_order():
    # eta = 0 is deterministic and affine for a Gaussian: whitened noise, no Monte Carlo error.
    objective = DDPMObjective()

    def error(steps):
        field = GaussianField(objective, MEANS4, COV4_DIAG, 4, chain=objective.respaced(str(steps)))
        x = sample(field, objective, whitened_noise(4096, 4).float(), labels(4096),
                   SamplerConfig(name="ddim", steps=steps, eta=0.0))
        return moment_error(x, MEANS4[0], COV4_DIAG)

    coarse, fine = error(100), error(200)
    assert fine < 0.02 and 1.7 < coarse / fine < 2.3, (coarse, fine)


def test_ddpm_guidance_all_channels_versus_legacy_three():
    guided_mean = MEANS4[2] + 3.0 * (MEANS4[1] - MEANS4[2])
    full, _ = ddpm_run(SamplerConfig(name="ddpm", steps=50, cfg_scale=3.0), cls=1)
    legacy, _ = ddpm_run(SamplerConfig(name="ddpm", steps=50, cfg_scale=3.0, legacy_cfg_channels=3), cls=1)
    assert standard_errors_off(full, guided_mean, COV4_DIAG) < STANDARD_ERRORS
    # Legacy guides channels 0..2 only: channel 3 keeps the conditional mean (dims independent).
    legacy_mean = torch.cat([guided_mean[:3], MEANS4[1, 3:]])
    assert standard_errors_off(legacy, legacy_mean, COV4_DIAG) < STANDARD_ERRORS
    assert abs(full[:, 3].mean() - legacy[:, 3].mean()) > 0.5


def test_ddpm_model_sees_original_timesteps():
    _, field = ddpm_run(SamplerConfig(name="ddpm", steps=10), n=4)
    assert [int(t[0]) for _, t, _ in field.calls] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert all(t.dtype == torch.float32 for _, t, _ in field.calls)    # model_time: float steps
    _, field = ddpm_run(SamplerConfig(name="ddim", respacing="ddim50"), n=4)
    assert [int(t[0]) for _, t, _ in field.calls] == list(range(980, -1, -20))


# -- guidance interval, call counts, determinism ------------------------------------------
def counting_run(config, kind="flow", n=5):
    objective = build_objective(ObjectiveConfig(kind=kind))
    chain = objective.respaced(config.respacing or str(config.steps)) if kind == "ddpm" else None
    means, cov = (MEANS, COV) if kind == "flow" else (MEANS4, COV4_DIAG)
    field = GaussianField(objective, means, cov, 3 if kind == "flow" else 4, chain=chain)
    noise = torch.randn(n, 3 if kind == "flow" else 4, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample(field, objective, noise, torch.arange(n) % 2, config, generator=torch.Generator().manual_seed(1))
    return out, field.calls


def test_guidance_interval_makes_the_expected_calls():
    n, low, high = 5, 0.25, 0.65     # bounds off every grid point: no float ties
    # Euler, 10 steps: step starts t = 1.0, 0.9, ..., 0.1; guided where low <= t <= high.
    starts = np.linspace(1, 0, 11)[:-1]
    _, calls = counting_run(SamplerConfig(name="euler", steps=10, cfg_scale=2.0, guidance_low=low,
                                          guidance_high=high))
    expected = [2 * n if low <= t <= high else n for t in starts]
    assert [b for b, _, _ in calls] == expected and expected.count(2 * n) == 4
    for b, t, y in calls:     # guided batches: conditional half, then null labels (= num_classes)
        if b == 2 * n:
            assert torch.equal(y[n:], torch.full((n,), 2)) and torch.equal(t[:n], t[n:])
    # Heun: two calls per step but the last, both guided by the step's start time (as released).
    _, calls = counting_run(SamplerConfig(name="heun", steps=10, cfg_scale=2.0, guidance_low=low,
                                          guidance_high=high))
    assert [b for b, _, _ in calls] == [b for b in expected for _ in range(2)][:-1]
    # Euler-Maruyama: steps on linspace(1, 0.04, 20), the last one included.
    _, calls = counting_run(SamplerConfig(name="euler_maruyama", steps=20, cfg_scale=2.0,
                                          guidance_low=low, guidance_high=high))
    assert [b for b, _, _ in calls] == [2 * n if low <= t <= high else n for t in np.linspace(1, 0.04, 20)]
    # DDPM with respacing: the interval is on original_step / T.
    _, calls = counting_run(SamplerConfig(name="ddpm", steps=10, cfg_scale=2.0, guidance_low=low,
                                          guidance_high=high), kind="ddpm")
    assert [b for b, _, _ in calls] == [2 * n if low <= s / 1000 <= high else n
                                        for s in (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)]


def test_cfg_scale_one_is_the_conditional_model_without_unconditional_passes():
    conditional, calls = counting_run(SamplerConfig(name="heun", steps=6, cfg_scale=1.0))
    assert all(b == 5 for b, _, _ in calls)
    # The same run with guidance but a null class equal to the conditional field is identical.
    objective = build_objective(ObjectiveConfig())
    field = GaussianField(objective, MEANS, COV, 3)
    y = torch.arange(5) % 2
    noise = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(0))

    class NullIsConditional(nn.Module):
        config = field.config

        def forward(self, x, t, labels):
            n = y.shape[0]
            return field(x, t, y.repeat(x.shape[0] // n))

    guided = sample(NullIsConditional(), objective, noise, y, SamplerConfig(name="heun", steps=6, cfg_scale=4.0))
    torch.testing.assert_close(guided, conditional, rtol=1e-5, atol=1e-6)


def test_guided_model_mixes_only_the_requested_channels():
    objective = build_objective(ObjectiveConfig())
    field = GaussianField(objective, MEANS4, torch.eye(4), 4)
    y, x, t = torch.tensor([0, 1]), torch.randn(2, 4, 1, 1), torch.full((2,), 0.5)
    cond, uncond = field(x, t, y), field(x, t, torch.full((2,), 2))
    mixed = uncond + 2.5 * (cond - uncond)
    full = GuidedModel(field, objective, y, SamplerConfig(cfg_scale=2.5), 4, torch.float32)(x, t, 0.5)
    legacy = GuidedModel(field, objective, y, SamplerConfig(cfg_scale=2.5, legacy_cfg_channels=3), 4,
                         torch.float32)(x, t, 0.5)
    torch.testing.assert_close(full, mixed)
    torch.testing.assert_close(legacy, torch.cat([mixed[:, :3], cond[:, 3:]], 1))
    assert not torch.allclose(full, legacy)


@pytest.mark.parametrize("config,kind", [(SamplerConfig(name="euler_maruyama", steps=8), "flow"),
                                         (SamplerConfig(name="ddpm", steps=8), "ddpm"),
                                         (SamplerConfig(name="ddim", steps=8, eta=0.5), "ddpm")])
def test_deterministic_given_a_generator(config, kind):
    objective = build_objective(ObjectiveConfig(kind=kind))
    chain = objective.respaced(str(config.steps)) if kind == "ddpm" else None
    field = GaussianField(objective, MEANS4, COV4_DIAG, 4, chain=chain)
    noise = torch.randn(6, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    run = [sample(field, objective, noise, labels(6), config, generator=torch.Generator().manual_seed(s))
           for s in (7, 7, 8)]
    assert torch.equal(run[0], run[1]) and not torch.allclose(run[0], run[2])


# -- configuration and the real backbone ---------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"name": "eulr"}, "sampler.name: expected one of 'euler', 'heun', 'euler_maruyama', 'ddpm', 'ddim', got 'eulr'"),
    ({"guidance_low": 0.8, "guidance_high": 0.2}, "interval is reversed"),
    ({"steps": 0}, "sampler.steps must be >= 1"),
    ({"diffusion": "3t"}, "sampler.diffusion: expected one of '2t', 'sigma', got '3t'"),
    ({"last_step": 0.0}, "sampler.last_step must be in (0, 1)"),
])
def test_config_errors_are_one_line(overrides, message):
    from selfalign.config.loader import ConfigError, from_dict
    with pytest.raises(ConfigError) as err:
        from_dict(SamplerConfig, overrides, "sampler")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampler_must_fit_the_objective():
    field = GaussianField(build_objective(ObjectiveConfig()), MEANS, COV, 3)
    with pytest.raises(ValueError, match="cannot sample a ddpm objective; use one of"):
        sample(field, DDPMObjective(), torch.zeros(2, 3, 1, 1), labels(2), SamplerConfig(name="heun"))


@pytest.mark.parametrize("family,kind,name", [("SiT", "flow", "heun"), ("DiT", "ddpm", "ddpm")])
def test_real_backbone_samples(family, kind, name):
    from selfalign.models.presets import build_model
    torch.manual_seed(0)
    model = build_model(f"{family}-T/2", input_size=8, in_channels=4, num_classes=10).eval()
    objective = build_objective(ObjectiveConfig(kind=kind))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = SamplerConfig(name=name, steps=3, cfg_scale=1.5, guidance_high=0.7)
    x = sample(model, objective, noise, torch.tensor([0, 4, 9]), config, generator=torch.Generator().manual_seed(0))
    assert x.shape == noise.shape and x.dtype == noise.dtype and torch.isfinite(x).all()
    unconditional = sample(model, objective, noise, None, SamplerConfig(name=name, steps=3),
                           generator=torch.Generator().manual_seed(0))
    assert unconditional.shape == noise.shape
