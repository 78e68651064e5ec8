"""Objectives: flow conversions, the DDPM schedule/posterior/VLB against float64 references,
respacing, SRA's discrete earlier time, and the objective factory."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from selfalign.config.loader import ConfigError, from_dict
from selfalign.objectives import (DDPMConfig, DDPMObjective, FlowConfig, FlowObjective,
                                  ObjectiveConfig, build_objective, space_timesteps)
from selfalign.objectives.ddpm import discretized_gaussian_log_likelihood, normal_kl


def reference_schedule(T=1000):
    """DDPM's linear schedule (Ho et al.), float64, written out independently of the code."""
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return betas, np.cumprod(1.0 - betas)


# -- flow conversions ------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_conversions_round_trip(path):
    objective = FlowObjective(FlowConfig(path=path))
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=gen), \
        torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.linspace(0.05, 1.0, 8, dtype=torch.float64)
    x_t = objective.interpolate(x0, eps, t)
    v = objective.velocity(x0, eps, t)
    x0_hat, eps_hat = objective.velocity_to_x0_noise(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(objective.velocity_to_x0(v, x_t, t), x0)
    torch.testing.assert_close(objective.velocity_to_noise(v, x_t, t), eps)
    score = objective.velocity_to_score(v, x_t, t)
    sigma = objective.coefficients(t)[1].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(score, -eps / sigma)
    keep = t < 1.0     # score -> velocity divides by alpha_t, which is 0 at t = 1
    torch.testing.assert_close(objective.score_to_velocity(score[keep], x_t[keep], t[keep]), v[keep])


# -- the DDPM schedule, forward process and posterior ----------------------------------------
def test_linear_beta_schedule_is_adm():
    betas, abar = reference_schedule()
    tables = DDPMObjective().diffusion.tables
    assert tables["betas"].dtype == torch.float64
    np.testing.assert_allclose(tables["betas"].numpy(), betas, rtol=1e-15)
    np.testing.assert_allclose(tables["alphas_cumprod"].numpy(), abar, rtol=1e-13)
    short = DDPMObjective(DDPMConfig(num_timesteps=500)).diffusion.tables["betas"].numpy()
    assert short[0] == pytest.approx(2e-4) and short[-1] == pytest.approx(0.04)   # scaled by 1000/T


def test_q_sample_and_posterior_match_float64_reference():
    betas, abar = reference_schedule()
    diffusion = DDPMObjective().diffusion
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen), \
        torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=gen)
    t = torch.tensor([0, 1, 2, 250, 998, 999])
    x_t = diffusion.q_sample(x0, eps, t)
    a = torch.from_numpy(abar)[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-12, atol=1e-12)

    mean, var, log_var = diffusion.q_posterior(x0, x_t, t)
    for i, step in enumerate(t.tolist()):
        if step == 0:   # q(x_{-1} | x_0, x0) is the point x0
            torch.testing.assert_close(mean[i], x0[i], rtol=1e-12, atol=1e-12)
            continue
        # Bayes: prior q(x_{t-1} | x0) = N(sqrt(abar') x0, 1 - abar'), likelihood N(sqrt(alpha) x_{t-1}, beta)
        prev, beta = abar[step - 1], betas[step]
        precision = 1 / (1 - prev) + (1 - beta) / beta
        ref_mean = (math.sqrt(prev) * x0[i] / (1 - prev) + math.sqrt(1 - beta) * x_t[i] / beta) / precision
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-10, atol=1e-12)
        assert var[i].flatten()[0].item() == pytest.approx(1 / precision, rel=1e-10)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(1 / precision), rel=1e-10)
    # the log variance at t = 0 is clipped to the value at t = 1
    assert log_var[0].flatten()[0].item() == pytest.approx(log_var[1].flatten()[0].item())
    # float32 inputs keep float32 and agree to float32 precision
    x_t32 = diffusion.q_sample(x0.float(), eps.float(), t)
    assert x_t32.dtype == torch.float32
    torch.testing.assert_close(x_t32, x_t.float(), rtol=1e-6, atol=1e-6)


def test_learned_range_spans_posterior_to_beta():
    diffusion = DDPMObjective().diffusion
    x_t, t = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.tensor([5, 700])
    for v, table in ((-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1)
        got = diffusion.p_mean_variance(out, x_t, t)["log_variance"]
        torch.testing.assert_close(got[:, 0, 0, 0], diffusion.tables[table][t])
    with pytest.raises(ValueError, match="expected 3 .eps. or 6"):
        diffusion.p_mean_variance(torch.zeros(2, 5, 2, 2), x_t, t)


# -- the VLB term and the hybrid loss ----------------------------------------------------------
def test_normal_kl_and_discretized_likelihood_on_hand_cases():
    # KL(N(0, 1) || N(1, 2)) = log(sqrt 2) + (1 + 1) / (2 * 2) - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(2.0)))
    assert kl.item() == pytest.approx(0.5 * math.log(2.0) + 0.5 - 0.5, rel=1e-6)
    x = torch.tensor([-1.0, 0.0, 0.3, 1.0], dtype=torch.float64)
    means = torch.tensor([-0.98, 0.0, 0.31, 0.99], dtype=torch.float64)
    scale = 0.02
    got = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, math.log(scale))).numpy()
    lo, hi = (x.numpy() - 1 / 255 - means.numpy()) / scale, (x.numpy() + 1 / 255 - means.numpy()) / scale
    exact = np.log([norm.cdf(hi[0]),                      # x = -1: the whole left tail
                    norm.cdf(hi[1]) - norm.cdf(lo[1]), norm.cdf(hi[2]) - norm.cdf(lo[2]),
                    1 - norm.cdf(lo[3])])                 # x = 1: the whole right tail
    np.testing.assert_allclose(got, exact, rtol=2e-3)    # ADM's tanh CDF approximation


def test_hybrid_loss_hand_cases_and_frozen_mean():
    betas, abar = reference_schedule()
    objective = DDPMObjective()
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen).clamp(-0.9, 0.9), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 500])
    x_t = objective.interpolate(x0, noise, t)
    # exact eps and v = -1 (variance = true posterior variance): KL = 0 for t >= 1
    perfect = torch.cat([noise, -torch.ones_like(noise)], 1)
    loss = objective.loss(perfect, x0, noise, t, x_t)
    assert loss[1:].abs().max().item() < 1e-5
    # at t = 0 the VLB term is the decoder NLL in bits/dim of x0 under N(x0, posterior_var[1])
    sd = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))
    exact_nll = -np.log(norm.cdf(1 / 255 / sd) - norm.cdf(-1 / 255 / sd)) / math.log(2)
    assert loss[0].item() == pytest.approx(exact_nll, rel=2e-3)
    # eps off by 0.1 (mse 0.01) and v = +1 (variance beta) at t = 500: the (frozen) mean is off by
    # d = coef1 * sqrt(1/abar - 1) * 0.1, and KL/dim = 0.5 (log b - log b~ + (b~ + d^2)/b - 1), in bits
    b, post = betas[500], betas[500] * (1 - abar[499]) / (1 - abar[500])
    d = b * math.sqrt(abar[499]) / (1 - abar[500]) * math.sqrt(1 / abar[500] - 1) * 0.1
    kl_bits = 0.5 * (math.log(b) - math.log(post) + (post + d ** 2) / b - 1) / math.log(2)
    wide = torch.cat([noise + 0.1, torch.ones_like(noise)], 1)
    loss = objective.loss(wide, x0, noise, t, x_t)
    assert loss[2].item() == pytest.approx(0.01 + kl_bits, rel=1e-4)
    # frozen mean: the VLB term sends no gradient into the eps channels
    out = wide.clone().requires_grad_(True)
    objective.loss(out, x0, noise, t, x_t).sum().backward()
    torch.testing.assert_close(out.grad[:, :2], 2 * (out[:, :2] - noise).detach() / noise[0].numel())
    assert out.grad[:, 2:].abs().sum() > 0


def test_plain_mse_without_learned_sigma_and_mismatch_errors():
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 900])
    plain = DDPMObjective(DDPMConfig(learn_sigma=False))
    x_t = plain.interpolate(x0, noise, t)
    eps_hat = noise + 0.5
    torch.testing.assert_close(plain.loss(eps_hat, x0, noise, t, x_t), torch.full((2,), 0.25))
    with pytest.raises(ValueError, match="learn_sigma=False but the model outputs 6 channels"):
        plain.loss(torch.zeros(2, 6, 4, 4), x0, noise, t, x_t)
    with pytest.raises(ValueError, match="learn_sigma=True but the model outputs 3 channels"):
        DDPMObjective().loss(eps_hat, x0, noise, t, x_t)


# -- respacing ----------------------------------------------------------------------------------
def test_space_timesteps_is_adm():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert set(np.diff(steps)) <= {4, 5}
    sections = space_timesteps(1000, "10,20")
    assert len(sections) == 30 and sum(s < 500 for s in sections) == 10
    assert {0, 499, 500, 999} <= set(sections)
    for bad, message in (("ddim999", "no constant stride"), ("2000", "cannot take 2000"),
                         ("fast", "expected a step count")):
        with pytest.raises(ValueError, match=message):
            space_timesteps(1000, bad)


def test_respaced_chain_keeps_original_indices_and_alpha_bar():
    objective = DDPMObjective()
    base = objective.diffusion.tables
    chain = objective.respaced("25")
    kept = space_timesteps(1000, "25")
    assert chain.num_timesteps == 25 and chain.timestep_map.tolist() == kept
    np.testing.assert_allclose(chain.tables["alphas_cumprod"].numpy(), base["alphas_cumprod"].numpy()[kept],
                               rtol=1e-12)
    assert chain.model_steps(torch.tensor([0, 24])).tolist() == [0, 999]
    full = objective.respaced("1000")
    np.testing.assert_allclose(full.tables["betas"].numpy(), base["betas"].numpy(), rtol=1e-9)


# -- time: sampling, model time, SRA's earlier time --------------------------------------------
def test_ddpm_times():
    objective = DDPMObjective()
    t = objective.sample_time(4096, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 900
    assert objective.model_time(t).dtype == torch.float32
    torch.testing.assert_close(objective.model_time(t), t.float())


def test_ddpm_earlier_time_is_the_released_discrete_interval():
    objective = DDPMObjective()
    t = torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0))
    t_prime = objective.earlier_time(t, 0.2, torch.Generator().manual_seed(1))
    assert t_prime.dtype == torch.long and t_prime.min() >= 1 and t_prime.max() <= 999
    inner = t >= 201    # away from the clamp: k = t - t' ~ randint(0, 200), per example
    k = (t - t_prime)[inner]
    assert k.min() == 0 and k.max() == 199 and k.unique().numel() == 200
    assert abs(k.float().mean().item() - 99.5) < 2.0
    assert torch.equal(t_prime[t == 0], torch.ones_like(t_prime[t == 0]))    # clamp(., 1, T-1)
    again = objective.earlier_time(t, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(t_prime, again)
    assert torch.equal(objective.earlier_time(t, 0.0), t.clamp(1, 999))
    short = DDPMObjective(DDPMConfig(num_timesteps=100))
    assert (torch.tensor([99] * 500) - short.earlier_time(torch.tensor([99] * 500), 0.2)).max() == 19


# -- the factory ------------------------------------------------------------------------------
def test_build_objective_from_config():
    assert isinstance(build_objective(), FlowObjective)
    flow = build_objective(from_dict(ObjectiveConfig, {"kind": "flow", "path": "cosine",
                                                       "time_sampling": "lognormal"}, "objective"))
    assert flow.kind == "flow" and flow.config.path == "cosine" and flow.config.time_sampling == "lognormal"
    ddpm = build_objective(from_dict(ObjectiveConfig, {"kind": "ddpm", "num_timesteps": 500,
                                                       "learn_sigma": False}, "objective"))
    assert isinstance(ddpm, DDPMObjective) and ddpm.num_timesteps == 500 and not ddpm.config.learn_sigma
    assert isinstance(build_objective(DDPMConfig()), DDPMObjective)
    assert isinstance(build_objective(FlowConfig()), FlowObjective)


@pytest.mark.parametrize("data,message", [
    ({"kind": "dpm"}, "objective.kind: expected one of 'flow', 'ddpm', got 'dpm'"),
    ({"kind": "ddpm", "beta_schedule": "cosine"}, "objective.beta_schedule: expected one of"),
    ({"kind": "flow", "path": "cos"}, "objective.path: expected one of 'linear', 'cosine', got 'cos'"),
    ({"kind": "ddpm", "num_timesteps": 1}, "objective.num_timesteps must be >= 2"),
    ({"kind": "ddpm", "timesteps": 10}, "objective.timesteps: unknown key"),
])
def test_objective_config_errors_are_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(ObjectiveConfig, data, "objective")
    assert message in str(err.value) and "\n" not in str(err.value)
