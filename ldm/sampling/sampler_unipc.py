"""UniPC (Zhao et al. 2023; diffusers ``UniPCMultistepScheduler``, ``solver_type="bh2"``): the multistep
predictor UniP and corrector UniC on the data prediction, in lambda = -log sigma."""

from __future__ import annotations

import math

import torch

from ldm.errors import SdgenError
from ldm.sampling.sampler_steps import Callback, DenoiserFn, NoiseSampler, _prepare, _report, _steps


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
