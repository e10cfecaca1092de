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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

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


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
}


__all__ = [
    "sample_ddim",
    "sample_plms",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "SAMPLERS",
    "get_ancestral_step",
    "to_d",
]
