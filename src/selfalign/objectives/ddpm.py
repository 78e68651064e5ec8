"""DDPM objective (DiT / ADM): discrete Gaussian diffusion, eps prediction, learned variance.

The formulas are ADM's (``gaussian_diffusion.py``, ``respace.py``), the ones DiT trains and
samples with:

* a ``T``-step beta schedule (``linear``: betas from 1e-4 to 0.02 scaled by 1000/T);
* the model predicts ``eps`` and, with a learned variance, ``C`` more channels ``v`` in
  ``[-1, 1]`` that interpolate the log variance between the clipped posterior variance
  (``v = -1``) and ``beta_t`` (``v = 1``);
* the hybrid loss ``MSE(eps) + L_vb``: the VLB term in bits per dimension with the predicted
  mean frozen (only the variance channels learn from it); the discretised Gaussian decoder NLL
  at ``t = 0``, the KL to the true posterior otherwise;
* timestep respacing (``"250"``, ``"ddim50"``, ``"10,20,30"``) for sampling: a shorter chain
  with recomputed betas whose model still sees the ORIGINAL timestep indices.

Time is an integer step ``0 .. T-1``, larger = noisier (:mod:`selfalign.conventions`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from ..choices import check_choices
from ..conventions import MAX_STEPS
from ..errors import ConfigError
from .base import Objective, expand_time, mean_flat

BetaSchedule = Literal["linear", "squaredcos_cap_v2"]
FixedVariance = Literal["large", "small"]


# -- schedules and respacing ---------------------------------------------------------------
def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """ADM's ``get_named_beta_schedule``, float64."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"objective.beta_schedule={name!r} is not one of {get_args(BetaSchedule)}")


def space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """ADM's ``space_timesteps``: the sorted original steps kept by a respacing string.

    ``"ddimN"``: a constant stride giving exactly N steps (DDIM paper). Otherwise comma-separated
    counts, one per equal section of the chain, each spread evenly with rounding (``"250"``).
    """
    spacing = spacing.strip()
    if spacing.startswith("ddim"):
        try:
            wanted = int(spacing[4:])
        except ValueError:
            raise ConfigError(f"respacing {spacing!r}: expected 'ddimN', e.g. 'ddim50'") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"respacing {spacing!r}: no constant stride gives exactly {wanted} of "
                          f"{num_timesteps} steps; use a plain count such as '{wanted}'")
    try:
        counts = [int(part) for part in spacing.split(",")]
    except ValueError:
        raise ConfigError(f"respacing {spacing!r}: expected a step count ('250'), section counts "
                          f"('10,20') or 'ddimN'") from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ConfigError(f"respacing {spacing!r}: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


# -- Gaussian helpers (ADM's diffusion_utils) -----------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF (kept for bit-compatible losses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of ``x`` (data scaled to [-1, 1] in bins of 2/255) under a Gaussian, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# -- the diffusion ---------------------------------------------------------------------------
class GaussianDiffusion:
    """ADM's discrete diffusion over a beta sequence: tables in float64, values in x's dtype.

    ``timestep_map[i]`` is the original step index of this chain's step ``i`` (identity for
    the full chain; the kept steps for a respaced one). Samplers give the model
    ``timestep_map[i]``, never ``i``.
    """

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None,
                 fixed_variance: str = "large"):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None
                                         else range(self.num_timesteps), dtype=torch.long)
        self.fixed_variance = fixed_variance
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        fixed_large = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
        tables = {
            "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var, "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
            "fixed_log_variance": np.log(fixed_large) if fixed_variance == "large" else post_log_var,
        }
        self.tables = {name: torch.from_numpy(value) for name, value in tables.items()}
        self._placed: dict[tuple, torch.Tensor] = {}

    def _get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at integer steps ``t``, broadcast against ``like`` in its dtype.

        Same values as ADM's float64 lookup then cast (casting commutes with indexing); each
        table is moved to a device/dtype once (also where float64 is unsupported, e.g. MPS).
        """
        key = (name, t.device, like.dtype)
        table = self._placed.get(key)
        if table is None:
            table = self._placed[key] = self.tables[name].to(like.dtype).to(t.device)
        return expand_time(table[t.long()], like)

    def model_steps(self, t: torch.Tensor) -> torch.Tensor:
        """Original step indices the model sees for this chain's steps ``t``."""
        return self.timestep_map.to(t.device)[t.long()]

    # -- forward process --------------------------------------------------------------------
    def q_sample(self, x0, noise, t):
        return self._get("sqrt_alphas_cumprod", t, x0) * x0 + \
            self._get("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x0)``."""
        mean = self._get("posterior_mean_coef1", t, x_t) * x0 + self._get("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._get("posterior_variance", t, x_t),
                self._get("posterior_log_variance_clipped", t, x_t))

    def x0_from_eps(self, x_t, t, eps):
        return self._get("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self._get("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def eps_from_x0(self, x_t, t, x0):
        return (self._get("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / \
            self._get("sqrt_recipm1_alphas_cumprod", t, x_t)

    # -- the model's reverse step -----------------------------------------------------------
    def split_output(self, model_output: torch.Tensor, channels: int):
        """(eps, v or None): the learned-range values follow the ``channels`` eps channels."""
        if model_output.shape[1] == 2 * channels:
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] == channels:
            return model_output, None
        raise ValueError(f"DDPM model output has {model_output.shape[1]} channels; expected "
                         f"{channels} (eps) or {2 * channels} (eps + learned variance)")

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """ADM's ``p_mean_variance`` for an eps-predicting model: mean, log variance, x0, eps."""
        eps, v = self.split_output(model_output, x_t.shape[1])
        if v is None:
            log_var = self._get("fixed_log_variance", t, x_t).expand_as(x_t)
        else:
            frac = (v + 1) / 2
            log_var = frac * self._get("log_betas", t, x_t) + \
                (1 - frac) * self._get("posterior_log_variance_clipped", t, x_t)
        x0 = self.x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "x0": x0, "eps": eps}

    def p_sample(self, model_output, x_t, t, noise, clip_denoised: bool = False):
        """One ancestral step ``x_t -> x_{t-1}`` (no noise at ``t = 0``)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        nonzero = expand_time((t != 0).to(x_t.dtype), x_t)
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(self, model_output, x_t, t, noise, eta: float = 0.0, clip_denoised: bool = False):
        """One DDIM step (Song et al.); ``eta = 0`` is deterministic, ``eta = 1`` ~ ancestral."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        eps = self.eps_from_x0(x_t, t, out["x0"])   # re-derived so clipping is respected, as ADM
        a_bar, a_bar_prev = self._get("alphas_cumprod", t, x_t), self._get("alphas_cumprod_prev", t, x_t)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        mean = out["x0"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma ** 2) * eps
        nonzero = expand_time((t != 0).to(x_t.dtype), x_t)
        return mean + nonzero * sigma * noise

    # -- training ---------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x0, x_t, t):
        """Per-example VLB term in bits/dim: decoder NLL at ``t = 0``, KL to the posterior otherwise."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output, x0, noise, t, x_t):
        """DiT's ``training_losses`` (LossType.MSE): ``MSE(eps)`` plus, with a learned variance,
        the VLB term with the mean frozen, so it trains only the variance channels."""
        eps, v = self.split_output(model_output, x0.shape[1])
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            return mse
        frozen = torch.cat([eps.detach(), v], dim=1)
        return mse + self.vb_terms_bpd(frozen, x0, x_t, t)


# -- the objective ---------------------------------------------------------------------------
@dataclass
class DDPMConfig:
    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"    # ADM names: "linear" (DiT), "squaredcos_cap_v2"
    learn_sigma: bool = True          # DiT: the model outputs eps and the variance (2C channels)
    fixed_variance: FixedVariance = "large"   # without learn_sigma: ADM's FIXED_LARGE or FIXED_SMALL

    def validate(self) -> None:
        if not 2 <= self.num_timesteps <= MAX_STEPS:
            raise ValueError(f"objective.num_timesteps must be in 2..{MAX_STEPS}, got {self.num_timesteps}")
        check_choices(self, "objective")


class DDPMObjective(Objective):
    """DiT's objective: integer time ``0 .. T-1``, eps prediction, hybrid loss with learned sigma."""

    kind = "ddpm"

    def __init__(self, config: DDPMConfig | None = None):
        self.config = config or DDPMConfig()
        self.config.validate()
        c = self.config
        self.diffusion = GaussianDiffusion(named_beta_schedule(c.beta_schedule, c.num_timesteps),
                                           fixed_variance=c.fixed_variance)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def respaced(self, spacing: str) -> GaussianDiffusion:
        """ADM's ``SpacedDiffusion``: the kept steps with betas recomputed from alpha-bar.

        ``spacing`` is ``"250"``, ``"ddim50"`` or section counts; its ``timestep_map`` holds
        the original indices the model must see.
        """
        kept = space_timesteps(self.num_timesteps, spacing)
        ac = self.diffusion.tables["alphas_cumprod"].numpy()
        kept_ac = ac[kept]
        betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
        return GaussianDiffusion(betas, timestep_map=kept, fixed_variance=self.config.fixed_variance)

    # -- Objective interface ----------------------------------------------------------------
    def sample_time(self, batch_size, device, generator=None):
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def interpolate(self, x0, noise, t):
        return self.diffusion.q_sample(x0, noise, t)

    def model_time(self, t):
        # DiT feeds the integer step itself to the sinusoidal timestep embedder.
        return t.float()

    def loss(self, model_output, x0, noise, t, x_t):
        channels = x0.shape[1]
        learned = model_output.shape[1] == 2 * channels
        if learned != self.config.learn_sigma:
            raise ValueError(f"objective.learn_sigma={self.config.learn_sigma} but the model outputs "
                             f"{model_output.shape[1]} channels for {channels} input channels; set "
                             f"model.learn_sigma to match")
        return self.diffusion.training_losses(model_output, x0, noise, t, x_t)

    def earlier_time(self, t, k_max, generator=None):
        """SRA (DiT): ``t' = clamp(t - randint(0, round(k_max * T)), 1, T - 1)`` per example."""
        span = int(round(k_max * self.num_timesteps))
        k = (torch.randint(0, span, t.shape, device=t.device, generator=generator) if span > 0
             else torch.zeros_like(t, dtype=torch.long))
        return (t.long() - k).clamp(1, self.num_timesteps - 1)
