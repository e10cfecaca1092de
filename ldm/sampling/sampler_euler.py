"""The Karras et al. 2022 samplers: Euler and Heun with optional churn (alg. 2; SGM ``EulerEDMSampler`` /
``HeunEDMSampler`` noise semantics) and Euler ancestral (KD ``sample_euler_ancestral``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.sampling.sampler_steps import (
    Callback,
    DenoiserFn,
    NoiseSampler,
    _ancestral_noise,
    _need_noise,
    _prepare,
    _report,
    _steps,
    get_ancestral_step,
    to_d,
)


@dataclass(frozen=True)
class _Churn:
    """Karras et al. 2022 alg. 2 churn settings: gamma_i = min(S_churn / N, sqrt(2) - 1) for S_tmin <= sigma
    <= S_tmax, else 0; the noise is scaled by S_noise."""

    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float

    def apply(
        self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, steps: int,
        noise_sampler: NoiseSampler | None, what: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x at sigma_hat, sigma_hat = sigma (1 + gamma)); noise sqrt(sigma_hat^2 - sigma^2) * S_noise is drawn
        only when gamma > 0 (SGM ``EulerEDMSampler``; k-diffusion draws every step)."""
        gamma = 0.0
        if self.s_churn > 0 and self.s_tmin <= float(sigma) <= self.s_tmax:
            gamma = min(self.s_churn / steps, 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            noise = _need_noise(noise_sampler, f"{what} with s_churn > 0")(sigma, sigma_next) * self.s_noise
            x = x + noise * (sigma_hat**2 - sigma**2) ** 0.5
        return x, sigma_hat


def _sample_euler_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None,
    callback: Callback | None,
    noise_sampler: NoiseSampler | None,
    churn: _Churn,
    heun: bool,
) -> torch.Tensor:
    """The loop of :func:`sample_euler` (``heun=False``) and :func:`sample_heun`: churn, the Euler step
    x += (sigma' - sigma_hat) d, and for Heun the trapezoidal correction (not on a step to sigma 0)."""
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    for i, sigma, sigma_next in _steps(sigmas):
        x, sigma_hat = churn.apply(x, sigma, sigma_next, n, noise_sampler, "Heun" if heun else "Euler")
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if heun and sigma_next != 0:
            x_2 = x + dt * d
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + dt * ((d + d_2) / 2)
        else:
            x = x + dt * d
        _report(callback, i, x, sigma, sigma_next, denoised, sigma_hat)
    return x

@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler with optional churn (Karras et al. 2022, alg. 2; SGM ``EulerEDMSampler``).

    gamma = min(s_churn / n, sqrt(2) - 1) for s_tmin <= sigma <= s_tmax; sigma_hat = sigma (1 + gamma); noise
    sqrt(sigma_hat^2 - sigma^2) * s_noise is drawn only when gamma > 0 (SGM; k-diffusion draws every step);
    d = (x - D(x, sigma_hat)) / sigma_hat; x += (sigma' - sigma_hat) d.
    """
    churn = _Churn(s_churn, s_tmin, s_tmax, s_noise)
    return _sample_euler_heun(denoiser, x, sigmas, extra_args, callback, noise_sampler, churn, heun=False)


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, alg. 2): Euler, then the trapezoidal correction with a
    second evaluation at sigma', except for a step to sigma 0 (Euler). Churn as in :func:`sample_euler`.
    """
    churn = _Churn(s_churn, s_tmin, s_tmax, s_noise)
    return _sample_euler_heun(denoiser, x, sigmas, extra_args, callback, noise_sampler, churn, heun=True)


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral (KD ``sample_euler_ancestral``): Euler to sigma_down, then noise * sigma_up (no noise
    on a step to sigma 0, where sigma_up is 0). With eta = 1 this samples the reverse SDE's ancestral chain."""
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_down - sigma)
        x = _ancestral_noise(x, sigma, sigma_next, sigma_up, s_noise, noise_sampler, "Euler ancestral")
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x
