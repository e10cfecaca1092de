"""Linear multistep (LMS) in sigma: Adams-Bashforth on a variable grid (KD ``sample_lms``), its coefficients
by exact quadrature of the Lagrange basis."""

from __future__ import annotations

import numpy as np
import torch

from ldm.errors import SdgenError
from ldm.sampling.sampler_steps import Callback, DenoiserFn, NoiseSampler, _prepare, _report, _steps, to_d


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
