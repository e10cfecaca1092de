"""The CompVis samplers: DDIM (CV ``ldm/models/diffusion/ddim.py``) and PLMS (CV ``plms.py``), in VE form on the
CompVis grid with integer t."""

from __future__ import annotations

import torch

from ldm.errors import SdgenError
from ldm.sampling.sampler_steps import (
    Callback,
    DenoiserFn,
    NoiseSampler,
    _ancestral_noise,
    _prepare,
    _report,
    _steps,
    get_ancestral_step,
)


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
