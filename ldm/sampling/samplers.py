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

The samplers live by family in :mod:`ldm.sampling.sampler_ddim` (DDIM, PLMS), :mod:`ldm.sampling.sampler_euler`
(Euler, Heun, Euler ancestral), :mod:`ldm.sampling.sampler_dpmpp` (the DPM-Solver++ family),
:mod:`ldm.sampling.sampler_lms` and :mod:`ldm.sampling.sampler_unipc`, the shared step pieces in
:mod:`ldm.sampling.sampler_steps`; this module is their name table (:data:`SAMPLERS`) and re-exports them.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldm.sampling.sampler_ddim import sample_ddim, sample_plms
from ldm.sampling.sampler_dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from ldm.sampling.sampler_euler import sample_euler, sample_euler_ancestral, sample_heun
from ldm.sampling.sampler_lms import lms_coefficients, sample_lms
from ldm.sampling.sampler_steps import get_ancestral_step, to_d
# the types of the sampler signature, re-exported for annotations
from ldm.sampling.sampler_steps import Callback, DenoiserFn, Model, NoiseSampler  # noqa: F401
from ldm.sampling.sampler_unipc import sample_unipc

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
