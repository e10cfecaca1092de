"""Samplers: small pure functions over a denoiser ``D(x, sigma, cond) -> x0`` (k-diffusion style).

All share ``sample_NAME(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, **options)``:

- ``x`` (B, C, H, W) is the VE sampler variable at ``sigmas[0]`` (:func:`ldm.sampling.grids.initial_x` of unit VP
  noise);
- ``sigmas`` is a descending grid (n + 1,) from :mod:`ldm.sampling.grids`;
- the denoiser is called as ``denoiser(x, sigma * ones(B), **extra_args)``, e.g. ``extra_args={"cond": ...}``;
- ``callback(info)`` is called exactly once per step, after every denoiser evaluation of that step, with
  ``info = {"x", "i", "sigma", "sigma_next", "sigma_hat", "denoised"}`` (``x`` is the new state; stateful
  guiders such as SLD advance their step there);
- ``noise_sampler(sigma, sigma_next) -> noise`` like x (:class:`ldm.sampling.noise.BatchedNoiseSampler`)
  is required only by the steps that add noise;
- the result is the VE variable at ``sigmas[-1]``; :func:`ldm.sampling.grids.final_latent` turns it into the
  latent the original would decode (identity when the grid ends at 0).

Each sampler reproduces its original: DDIM and PLMS (CV ``ldm/models/diffusion/ddim.py``, ``plms.py``) on the
CompVis grid with integer t; DPM-Solver++(2M) (KD ``sample_dpmpp_2m``; on the CompVis time-uniform grid with
continuous t it is CV ``dpm_solver`` multistep order 2); Euler / Heun (Karras et al. 2022, alg. 2; SGM
``EulerEDMSampler`` / ``HeunEDMSampler`` noise semantics) and Euler ancestral (KD).

The k-diffusion family follows the published KD algorithms (DPM++ 2M SDE, DPM++ SDE, DPM++ 2S ancestral,
DPM++ 3M SDE, LMS; their grids: :data:`ldm.sampling.grids.DEFAULT_GRID`); UniPC follows Zhao et al. 2023 (diffusers
``UniPCMultistepScheduler``, ``solver_type="bh2"``). The multistep ones are written in lambda = -log sigma.
On a grid that ends at sigma 0 their last step is a plain denoise (x' = D; LMS, like KD, integrates its
polynomial down to 0). The SDE samplers draw their noise from a Brownian motion
(:class:`ldm.sampling.noise.BrownianTreeNoiseSampler`): ``noise_sampler(sigma, sigma')`` is then the normalised
increment of one path, so a finer grid samples the same path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ldm.errors import SdgenError

DenoiserFn = Callable[..., torch.Tensor]
Callback = Callable[[dict], Any]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model(x, sigma): the denoiser at a scalar sigma


# ---------------------------------------------------------------------------------------------------------------
# helpers: the pieces of a step that several samplers share
# ---------------------------------------------------------------------------------------------------------------


def _prepare(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None
) -> tuple[torch.Tensor, Model]:
    """Sigmas on x's device (float32, or float64 for float64 x) and ``model(x, sigma)``: the denoiser at the
    scalar ``sigma`` broadcast to the batch, ``denoiser(x, sigma * ones(B), **extra_args)``."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=dtype)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise SdgenError(f"a sampler needs a 1-D grid of at least 2 sigmas, got shape {tuple(sigmas.shape)}")
    extra = dict(extra_args or {})
    s_in = torch.ones(x.shape[0], device=x.device, dtype=dtype)

    def model(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoiser(x_in, sigma * s_in, **extra)

    return sigmas, model


def _steps(sigmas: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(i, sigma_i, sigma_{i+1})`` for each step of a descending grid (0-d tensors)."""
    for i in range(len(sigmas) - 1):
        yield i, sigmas[i], sigmas[i + 1]


def _need_noise(noise_sampler: NoiseSampler | None, what: str) -> NoiseSampler:
    if noise_sampler is None:
        raise SdgenError(f"{what} adds noise: pass a noise_sampler (ldm.sampling.noise.BatchedNoiseSampler)")
    return noise_sampler


def _report(
    callback: Callback | None,
    i: int,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    denoised: torch.Tensor,
    sigma_hat: torch.Tensor | None = None,
) -> None:
    """The once-per-step callback (module docstring); ``sigma_hat`` defaults to ``sigma`` (no churn)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next,
                  "sigma_hat": sigma if sigma_hat is None else sigma_hat, "denoised": denoised})


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3)."""
    if sigma.ndim:
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (x - denoised) / sigma


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step (KD ``get_ancestral_step``).

    sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)) and
    sigma_down = sqrt(sigma_to^2 - sigma_up^2). In VE form this is exactly the DDIM sigma_t(eta) of Song et al.
    2021 eq. 16 (CV ddim.py ``make_ddim_sampling_parameters``): sigma_up = sigma_t(eta) / sqrt(alphabar_prev).
    """
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _ancestral_noise(
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_up: torch.Tensor,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
    what: str,
) -> torch.Tensor:
    """The noise half of an ancestral step: x + noise * s_noise * sigma_up (x itself when sigma_up is 0)."""
    if sigma_up > 0:
        return x + _need_noise(noise_sampler, what)(sigma, sigma_next) * s_noise * sigma_up
    return x


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


# ---------------------------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in VE form: x' = D + sigma_down * eps (+ sigma_up * noise), eps = (x - D) / sigma.

    With eta = 0 this is Euler on the probability-flow ODE, x' = D + sigma' (x - D) / sigma, which is CompVis's
    x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev) e_t divided by sqrt(a_prev). With eta > 0 the noise
    split is :func:`get_ancestral_step` (= the CompVis sigma_t(eta)); ``s_noise`` plays CompVis's
    ``temperature``. A step to sigma 0 returns D.
    """
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
            eps = (x - denoised) / sigma
            x = denoised + eps * sigma_down
            x = _ancestral_noise(x, sigma, sigma_next, sigma_up, s_noise, noise_sampler, "DDIM with eta > 0")
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_plms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo numerical methods"), as CompVis ``plms.py`` runs it.

    Linear multistep on eps with the DDIM transfer x' = x0' + sigma' eps', x0' = x - sigma eps':
    step 1 is the pseudo improved Euler step (DDIM with e_t, e at (x_prev, sigma'), average: two denoiser
    calls); then Adams-Bashforth 2/3/4 (3e - e1)/2, (23e - 16e1 + 5e2)/12, (55e - 59e1 + 37e2 - 9e3)/24.
    The history holds the raw eps of each step. A step to sigma 0 uses e_t alone for the first step.
    Deviation: for a one-step grid CompVis evaluates the second call at the same t; here it is at sigma'.
    """
    if eta != 0:
        raise SdgenError("PLMS is deterministic: eta must be 0 (as in CompVis plms.py)")
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    old_eps: list[torch.Tensor] = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        if not old_eps:
            if sigma_next > 0:
                x_prev = denoised + eps * sigma_next
                eps_next = (x_prev - model(x_prev, sigma_next)) / sigma_next
                eps_prime = (eps + eps_next) / 2
            else:
                eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = (x - eps_prime * sigma) + eps_prime * sigma_next
        old_eps = (old_eps + [eps])[-3:]
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) with lambda = -log sigma, h = lambda' - lambda.

    x' = (sigma'/sigma) x - expm1(-h) D', D' = D for the first step and any step to sigma 0, else
    D' = (1 + 1/(2r)) D - 1/(2r) D_prev with r = h_prev / h (KD ``sample_dpmpp_2m``; CV dpm_solver.py
    ``multistep_dpm_solver_second_update`` in VE form). ``lower_order_final``: with fewer than 15 steps the
    last step is first order (CV dpm_solver ``lower_order_final=True``; diffusers the same).
    """
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            first_order = old_denoised is None or (lower_order_final and n < 15 and i == n - 1)
            if first_order:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
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


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++ family, LMS and UniPC
# ---------------------------------------------------------------------------------------------------------------


def _exp_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """First-order data-prediction step from sigma to sigma_to (DPM-Solver++(1) = DDIM with eta 0):
    x' = (sigma_to / sigma) x - expm1(-h) D with h = log(sigma / sigma_to); sigma_to = 0 gives D."""
    h = sigma.log() - sigma_to.log()
    return (sigma_to / sigma) * x - torch.expm1(-h) * denoised


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M); KD ``sample_dpmpp_2m_sde``).

    With h = lambda' - lambda and h_eta = (1 + eta) h: x' = (sigma'/sigma) e^(-eta h) x - expm1(-h_eta) D,
    plus, from the second step on, the correction (D - D_prev) / r (r = h_prev / h) weighted by
    -expm1(-h_eta) / 2 ("midpoint") or 1 + expm1(-h_eta) / h_eta ("heun", the exact integral of the linear
    interpolant), plus noise * sigma' sqrt(-expm1(-2 eta h)) * s_noise. eta = 0 is the probability-flow ODE
    (then "midpoint" is :func:`sample_dpmpp_2m` without ``lower_order_final``). A step to sigma 0 returns D.
    """
    # source: k-diffusion sampling.py sample_dpmpp_2m_sde; Lu et al. 2022, arXiv:2211.01095
    if solver_type not in ("midpoint", "heun"):
        raise SdgenError(f"DPM++ 2M SDE solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    old_denoised: torch.Tensor | None = None
    h_last: torch.Tensor | None = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = (sigma_next / sigma) * torch.exp(-eta * h) * x - torch.expm1(-h_eta) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    weight = 1 + torch.expm1(-h_eta) / h_eta
                else:
                    weight = -0.5 * torch.expm1(-h_eta)
                x = x + (weight / r) * (denoised - old_denoised)
            if eta:
                noise = _need_noise(noise_sampler, "DPM++ 2M SDE")(sigma, sigma_next)
                x = x + noise * (sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise)
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ SDE: the two-stage (2S) data-prediction solver with ancestral noise at both stages.

    Stage 1 goes to sigma_s = exp(-(lambda + r h)) (the geometric mean for r = 1/2): a first-order step to the
    ancestral sigma_down of (sigma, sigma_s), then noise * sigma_up. Stage 2 steps from x to the sigma_down of
    (sigma, sigma') with D' = (1 - 1/(2r)) D + 1/(2r) D(x_s, sigma_s), then its noise. The two noises are the
    increments of one Brownian path over [sigma_s, sigma] and [sigma', sigma] (they overlap): they are built
    from ``noise_sampler(sigma, sigma_s)`` and ``noise_sampler(sigma_s, sigma')``, z' = (z_1 sqrt(sigma -
    sigma_s) + z_2 sqrt(sigma_s - sigma')) / sqrt(sigma - sigma'), which with a Brownian noise sampler is its
    increment over [sigma', sigma] and with independent draws has the same law. A step to sigma 0 is Euler (= D).
    """
    # source: k-diffusion sampling.py sample_dpmpp_sde; Lu et al. 2022, arXiv:2211.01095
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    fac = 1 / (2 * r)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            h = sigma.log() - sigma_next.log()
            sigma_s = torch.exp(sigma.log() - r * h)
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_s, eta)
            x_2 = _exp_step(x, denoised, sigma, sigma_down)
            if eta:
                sample_noise = _need_noise(noise_sampler, "DPM++ SDE")
                z_1, z_2 = sample_noise(sigma, sigma_s), sample_noise(sigma_s, sigma_next)
                z = (z_1 * (sigma - sigma_s).sqrt() + z_2 * (sigma_s - sigma_next).sqrt()) / (sigma - sigma_next).sqrt()
                x_2 = x_2 + z_1 * s_noise * sigma_up
            denoised_2 = model(x_2, sigma_s)
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = _exp_step(x, denoised_d, sigma, sigma_down)
            if eta:
                x = x + z * s_noise * sigma_up
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    """DPM-Solver++(2S) ancestral: the single-step second-order solver from sigma to the ancestral sigma_down
    (midpoint sigma_s = sqrt(sigma sigma_down) in lambda, x' = (sigma_down/sigma) x - expm1(-h) D(x_s, sigma_s)),
    then noise * sigma_up. Where sigma_down is 0 (a step to sigma 0) the step is Euler (= D)."""
    # source: k-diffusion sampling.py sample_dpmpp_2s_ancestral; Lu et al. 2022, arXiv:2211.01095
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = sigma.log() - sigma_down.log()
            sigma_s = torch.exp(sigma.log() - h / 2)
            x_2 = _exp_step(x, denoised, sigma, sigma_s)
            x = _exp_step(x, model(x_2, sigma_s), sigma, sigma_down)
        x = _ancestral_noise(x, sigma, sigma_next, sigma_up, s_noise, noise_sampler, "DPM++ 2S ancestral")
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
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
    """DPM-Solver++(3M) SDE: the multistep solver with a quadratic (in lambda) model of D.

    h_eta = (1 + eta) h; x' = e^(-h_eta) x - expm1(-h_eta) D + phi_2 d1 - phi_3 d2 with
    phi_2 = 1 + expm1(-h_eta) / h_eta, phi_3 = phi_2 / h_eta - 1/2, d1 / d2 the divided differences of the
    last three D in units of h (r0 = h_1 / h, r1 = h_2 / h). The second step uses the linear model alone, the
    first none; then noise * sigma' sqrt(-expm1(-2 eta h)) * s_noise. The d2 term carries the weight of the
    published algorithm (half the Taylor weight of the quadratic's curvature: the method is second order as an
    ODE solver, with a smaller error constant than 2M). A step to sigma 0 returns D.
    """
    # source: k-diffusion sampling.py sample_dpmpp_3m_sde; Lu et al. 2022, arXiv:2211.01095
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = 1 + torch.expm1(-h_eta) / h_eta
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                noise = _need_noise(noise_sampler, "DPM++ 3M SDE")(sigma, sigma_next)
                x = x + noise * (sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# Gauss-Legendre nodes / weights on [-1, 1]: exact for polynomials of degree <= 9, so for the Lagrange
# basis of any LMS order up to 10.
_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(5)


def lms_coefficients(nodes: list[float], a: float, b: float) -> list[float]:
    """Integrals over [a, b] of the Lagrange basis polynomials on ``nodes`` (float64, exact quadrature).

    ``nodes[j]`` is where derivative j of the history was taken (nodes[0] the newest); the LMS step is
    x' = x + sum_j c_j d_j.
    """
    if len(nodes) > 10:
        raise SdgenError(f"LMS order at most 10, got {len(nodes)}")
    s = 0.5 * (b - a) * _GAUSS_X + 0.5 * (a + b)
    coeffs = []
    for j, node_j in enumerate(nodes):
        basis = np.ones_like(s)
        for k, node_k in enumerate(nodes):
            if k != j:
                basis *= (s - node_k) / (node_j - node_k)
        coeffs.append(float(0.5 * (b - a) * np.dot(_GAUSS_W, basis)))
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep in sigma: x' = x + integral over [sigma, sigma'] of the polynomial through the last
    ``order`` derivatives d = (x - D) / sigma at their sigmas (Adams-Bashforth on a variable grid, the
    coefficients by :func:`lms_coefficients`). The first steps use the history they have. Like KD it
    integrates its polynomial down to a final sigma 0 (d is never evaluated there)."""
    # source: k-diffusion sampling.py sample_lms / linear_multistep_coeff
    if order < 1:
        raise SdgenError(f"LMS order must be at least 1, got {order}")
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    grid = sigmas.detach().to("cpu", torch.float64).tolist()
    ds: list[torch.Tensor] = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        nodes = [grid[i - k] for k in range(len(ds))]
        coeffs = lms_coefficients(nodes, grid[i], grid[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _unipc_b(h: float) -> tuple[float, float, float]:
    """(B(h), b_1, b_2) of UniPC in data prediction with B(h) = expm1(-h) ("bh2"): with hh = -h,
    phi_1 = expm1(hh) / hh - 1, phi_2 = phi_1 / hh - 1/2, b_k = k! phi_k / B(h)."""
    hh = -h
    b_h = math.expm1(hh)
    phi_1 = b_h / hh - 1
    phi_2 = phi_1 / hh - 0.5
    return b_h, phi_1 / b_h, 2 * phi_2 / b_h


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 2,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP and corrector UniC on the data prediction D.

    In lambda = -log sigma with h = lambda' - lambda and B(h) = expm1(-h) ("bh2"):

    - UniP-p: x' = (sigma'/sigma) x - expm1(-h) D - B(h) rho D1 with, for p = 2, rho = 1/2 and
      D1 = (D_prev - D) / r, r = (lambda_prev - lambda) / h (p = 1: no D1 term; p = 2 is DPM-Solver++(2M));
    - UniC: once D_k at the new point is known, the step that produced x_k is redone as
      x_k = (sigma_k/sigma_{k-1}) x_{k-1} - expm1(-h) D_{k-1} - B(h) (rho_1 D1 + rho_c (D_k - D_{k-1})),
      (rho_1, rho_c) solving [[1, 1], [r, 1]] rho = (b_1, b_2) (:func:`_unipc_b`) after an order-2 step and
      rho_c = 1/2 after an order-1 step. The corrected x_k feeds the next step; D_k is not re-evaluated.

    The order rises from 1 with the history; ``lower_order_final`` makes the last step first order (diffusers
    ``UniPCMultistepScheduler`` defaults). A step to sigma 0 returns D. ``order`` is 1 or 2.
    """
    # source: Zhao et al. 2023, arXiv:2302.04867 (UniPC, B(h) variant "bh2"); diffusers UniPCMultistepScheduler
    if order not in (1, 2):
        raise SdgenError(f"UniPC order must be 1 or 2, got {order}")
    sigmas, model = _prepare(denoiser, x, sigmas, extra_args)
    n = len(sigmas) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas.detach().to("cpu", torch.float64).tolist()]
    history: list[torch.Tensor] = []  # D at grid points i - len + 1 .. i
    x_last: torch.Tensor | None = None
    last_order = 0
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = model(x, sigma)
        if x_last is not None and sigma_next != 0:
            # UniC: redo the step lam[i-1] -> lam[i] with the new D
            h = lam[i] - lam[i - 1]
            b_h, b_1, b_2 = _unipc_b(h)
            d_prev = history[-1]
            x = (sigmas[i] / sigmas[i - 1]) * x_last - math.expm1(-h) * d_prev
            if last_order == 2:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho_1, rho_c = (b_1 - b_2) / (1 - r), (b_2 - r * b_1) / (1 - r)
                x = x - b_h * (rho_1 * ((history[-2] - d_prev) / r) + rho_c * (denoised - d_prev))
            else:
                x = x - b_h * (0.5 * (denoised - d_prev))
        history = (history + [denoised])[-2:]
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, len(history))
        x_last, last_order = x, step_order
        if sigma_next == 0:
            x = denoised
        else:
            # UniP
            h = lam[i + 1] - lam[i]
            x = (sigma_next / sigma) * x_last - math.expm1(-h) * denoised
            if step_order == 2:
                r = (lam[i - 1] - lam[i]) / h
                x = x - math.expm1(-h) * (0.5 * ((history[-2] - denoised) / r))
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "lms": sample_lms,
    "unipc": sample_unipc,
}


__all__ = [
    "sample_ddim",
    "sample_plms",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_lms",
    "sample_unipc",
    "lms_coefficients",
    "SAMPLERS",
    "get_ancestral_step",
    "to_d",
]
