"""The pieces of a sampler step that several samplers share: the denoiser at a scalar sigma, the step loop,
the once-per-step callback, the probability-flow derivative and the ancestral noise split.

The sampler interface these serve is described in :mod:`ldm.sampling.samplers`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from ldm.errors import SdgenError

DenoiserFn = Callable[..., torch.Tensor]
Callback = Callable[[dict], Any]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model(x, sigma): the denoiser at a scalar sigma


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
    """The once-per-step callback (:mod:`ldm.sampling.samplers`); ``sigma_hat`` defaults to ``sigma`` (no churn)."""
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
