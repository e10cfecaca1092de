"""The DPM-Solver++ family (Lu et al. 2022), in lambda = -log sigma: 2M (KD ``sample_dpmpp_2m``; CV
``dpm_solver`` multistep order 2 on the time-uniform grid), 2M SDE, SDE, 2S ancestral and 3M SDE (the
published KD algorithms)."""

from __future__ import annotations

import torch

from ldm.errors import SdgenError
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


def _exp_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
    """First-order data-prediction step from sigma to sigma_to (DPM-Solver++(1) = DDIM with eta 0):
    x' = (sigma_to / sigma) x - expm1(-h) D with h = log(sigma / sigma_to); sigma_to = 0 gives D."""
    h = sigma.log() - sigma_to.log()
    return (sigma_to / sigma) * x - torch.expm1(-h) * denoised


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
