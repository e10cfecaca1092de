"""Named sigma grids, the grid each sampler's original runs on, and the ways a run cuts a grid.

A grid is a descending float32 tensor of sigmas (n + 1,) (:mod:`ldm.sampling.schedules` builds them from a
training alphabar). This module names them (:data:`GRIDS`), says which one each sampler's original uses
(:data:`DEFAULT_GRID`) and which denoiser time mode goes with it, and cuts grids for the three kinds of run that
do not start from pure noise at the top of the grid:

- img2img (:func:`img2img_sigmas`): CompVis ``scripts/img2img.py`` on its DDIM grid (noise at index t_enc, run
  from t_enc - 1: the original's off-by-one), SGM's pruning to the ``int(strength * len)`` lowest entries on
  every other grid;
- SDEdit (:func:`sdedit_sigmas`): the SGM pruning, refusing a strength that leaves no step;
- the SDXL base -> refiner hand-over (:func:`split_sigmas`): the base runs the timesteps
  t >= round(1000 (1 - high_noise_frac)), the refiner the rest, from the same sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.errors import SdgenError
from ldm.sampling import schedules


@dataclass(frozen=True)
class GridInfo:
    """A sigma grid family: what it reproduces and the denoiser time mode that goes with it."""

    time_mode: str
    description: str


GRIDS: dict[str, GridInfo] = {
    "ddim": GridInfo("integer", "CompVis DDIM/PLMS: t = range(0, N, N // S) + 1, ends at alphabar[0]"),
    "dpm_solver": GridInfo("continuous", "CompVis --dpm_solver: time-uniform t in [1, 1/N], ends at alphabar[0]"),
    "sgm": GridInfo("nearest", "SGM LegacyDDPMDiscretization: t = linspace(N-1, 0, S, endpoint=False), then 0"),
    "sgm_legacy": GridInfo("nearest", "SGM 0.9 release: t = range(0, N, N // S) + 1, then 0"),
    "karras": GridInfo("interpolate", "Karras et al. 2022 rho=7 between the table's sigma_min and sigma_max, then 0"),
    "linspace_t": GridInfo("interpolate", "k-diffusion: t = linspace(N-1, 0, S) in log-sigma, then 0"),
    "exponential": GridInfo("interpolate", "k-diffusion: log-linear from the table's sigma_max to sigma_min, then 0"),
    "sgm_uniform": GridInfo("interpolate", "ComfyUI sgm_uniform: t = linspace(N-1, 0, S + 1)[:-1], then 0"),
}

#: The two SGM timestep grids of SDXL: "sgm" (evenly spaced, ends at t = 999, SGM since e9869d7 and SDXL 1.0)
#: and "sgm_legacy" (the 0.9 release's range(0, 1000, 1000 // S) + 1).
SDXL_GRIDS = ("sgm", "sgm_legacy")

# The grid each sampler's original uses: DDIM/PLMS on the CompVis grid; DPM-Solver++(2M) on CompVis
# --dpm_solver's (time_uniform, continuous t; this reproduces CV txt2img --dpm_solver); Euler family on SGM's.
# The k-diffusion family on the grid A1111's "Automatic" schedule gives each (its sampler table): DPM++ SDE and
# 2S ancestral on Karras sigmas, DPM++ 2M SDE and 3M SDE on exponential ones (the 2M / 3M SDE steps overshoot
# the data variance on the t-uniform grid, whose last steps are long in lambda), LMS on k-diffusion's own
# discretisation ("linspace_t"). A1111 also drops the next-to-last sigma for 3M SDE; here the grid is used as
# is. UniPC runs on "sgm": diffusers' UniPCMultistepScheduler spaces integer timesteps evenly from t = 999
# down and ends at sigma 0, which is the SGM timestep grid.
DEFAULT_GRID: dict[str, str] = {
    "ddim": "ddim",
    "plms": "ddim",
    "dpmpp_2m": "dpm_solver",
    "euler": "sgm",
    "euler_ancestral": "sgm",
    "heun": "sgm",
    "dpmpp_2m_sde": "exponential",
    "dpmpp_sde": "karras",
    "dpmpp_2s_ancestral": "karras",
    "dpmpp_3m_sde": "exponential",
    "lms": "linspace_t",
    "unipc": "sgm",
}

#: A1111's "Schedule type" names (:func:`schedule_grid`): "default" is the sampler's own grid.
SCHEDULES = ("default", "karras", "exponential", "sgm_uniform")

# samplers whose update is tied to the integer timesteps of their grid: only their own schedule
_TIMESTEP_SAMPLERS = ("ddim", "plms")


def grid_sigmas(
    grid: str, alphas_cumprod, steps: int, *, rho: float = 7.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Descending sigmas (steps + 1,) of grid ``grid`` (:data:`GRIDS`) for a training alphabar (N,).

    float32 like the originals; ``dtype=torch.float64`` keeps the table values exact (the SGM grids are
    defined by float32 operations and stay float32-valued). The CompVis DDIM grid has more than steps + 1
    entries when steps does not divide N (original quirk).
    """
    if grid == "ddim":
        return schedules.ddim_sigmas(alphas_cumprod, steps, dtype=dtype)
    if grid == "dpm_solver":
        return schedules.dpm_solver_sigmas(alphas_cumprod, steps, dtype=dtype)
    if grid in SDXL_GRIDS:
        return schedules.sgm_grid(alphas_cumprod, steps, legacy_range=grid == "sgm_legacy").to(dtype)
    if grid == "karras":
        table = schedules.sigmas_from_alphas_cumprod(alphas_cumprod)
        return schedules.karras_sigmas(steps, float(table[0]), float(table[-1]), rho, dtype=dtype)
    if grid == "linspace_t":
        return schedules.linspace_t_sigmas(alphas_cumprod, steps, dtype=dtype)
    if grid == "exponential":
        table = schedules.sigmas_from_alphas_cumprod(alphas_cumprod)
        return schedules.exponential_sigmas(steps, float(table[0]), float(table[-1]), dtype=dtype)
    if grid == "sgm_uniform":
        return schedules.sgm_uniform_sigmas(alphas_cumprod, steps, dtype=dtype)
    raise SdgenError(f"unknown sigma grid {grid!r} ({', '.join(GRIDS)})")


def sampler_grid(sampler: str, grid: str | None = None) -> str:
    """The grid a run of ``sampler`` uses: ``grid`` when given, else the sampler's original one."""
    from ldm.sampling.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {sampler!r} ({', '.join(SAMPLERS)})")
    return grid or DEFAULT_GRID[sampler]


def schedule_grid(schedule: str, sampler: str, sdxl_grid: str | None = None) -> str:
    """The grid of A1111's "Schedule type" ``schedule`` (:data:`SCHEDULES`) for ``sampler``.

    "default" is the sampler's own grid: ``sdxl_grid`` when given (an SDXL run), else :data:`DEFAULT_GRID`;
    "karras", "exponential" and "sgm_uniform" are the grids of those names.

    Raises:
        SdgenError: an unknown schedule or sampler, or DDIM / PLMS with a schedule other than "default".
    """
    if schedule not in SCHEDULES:
        raise SdgenError(f"unknown schedule {schedule!r} ({', '.join(SCHEDULES)})")
    if sampler not in DEFAULT_GRID:
        raise SdgenError(f"unknown sampler {sampler!r} ({', '.join(DEFAULT_GRID)})")
    if schedule == "default":
        return sdxl_grid or DEFAULT_GRID[sampler]
    if sampler in _TIMESTEP_SAMPLERS:
        raise SdgenError(f"the {sampler} sampler steps between integer timesteps: it takes only the default "
                         f"schedule, not {schedule!r}")
    return schedule


def sampler_sigmas(name: str, alphas_cumprod, steps: int, grid: str | None = None, **options) -> torch.Tensor:
    """The grid sampler ``name`` uses in its original (:data:`DEFAULT_GRID`), or ``grid`` if given."""
    return grid_sigmas(sampler_grid(name, grid), alphas_cumprod, steps, **options)


def time_mode(grid: str) -> str:
    """The denoiser time mode that reproduces the originals on ``grid`` (:data:`GRIDS`)."""
    if grid not in GRIDS:
        raise SdgenError(f"unknown sigma grid {grid!r} ({', '.join(GRIDS)})")
    return GRIDS[grid].time_mode


def default_time_mode(sampler: str, grid: str | None = None) -> str:
    """Denoiser time mode matching ``sampler`` on ``grid`` (its original grid if None)."""
    return time_mode(sampler_grid(sampler, grid))


# ----------------------------------------------------------------------------- start and end of a run


def initial_x(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Unit VP noise x_T -> sampler input noise * sqrt(1 + sigmas[0]^2) (CompVis and SGM; not k-diffusion's
    noise * sigma_max)."""
    return schedules.vp_to_ve(noise, sigmas[0])


def final_latent(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sampler result at sigmas[-1] -> the latent the original decodes: x / sqrt(1 + sigmas[-1]^2)."""
    if float(sigmas[-1]) == 0.0:
        return x
    return schedules.ve_to_vp(x, sigmas[-1])


# ----------------------------------------------------------------------------- img2img and SDEdit


def sdedit_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The SDEdit part of a descending grid: its ``max(int(strength * len(sigmas)), 1)`` lowest entries (SGM
    ``Img2ImgDiscretizationWrapper``). 50 steps, strength 0.3: 15 entries, 14 steps from t = 279 ("sgm") or
    t = 261 ("sgm_legacy").

    Raises:
        SdgenError: strength outside (0, 1], or so low that no step is left.
    """
    if not 0.0 < strength <= 1.0:
        raise SdgenError(f"--strength must be in (0, 1], got {strength}")
    run = schedules.sgm_img2img_sigmas(sigmas, strength)
    if len(run) < 2:
        raise SdgenError(
            f"--strength {strength} with {len(sigmas) - 1} steps leaves no denoising step "
            f"(int(strength * (steps + 1)) must be at least 2); raise --strength or --steps"
        )
    return run


def img2img_sigmas(grid: str, sigmas: torch.Tensor, strength: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise level of the init latent, descending grid to run) for img2img on ``grid``.

    On the CompVis DDIM grid: CV scripts/img2img.py (``t_enc = int(strength * steps)``, its off-by-one kept);
    where the original fails (t_enc past the last step, i.e. strength 1.0) the latent is noised to the top of
    the grid and every step runs. On other grids: SDEdit (:func:`sdedit_sigmas`), which starts where it noises.
    """
    if grid == "ddim":
        if int(strength * steps) < 1:
            raise SdgenError(f"--strength {strength} with {steps} steps leaves no denoising step "
                             "(int(strength * steps) must be at least 1)")
        if int(strength * steps) >= len(sigmas) - 1:
            return sigmas[0], sigmas
        return schedules.compvis_img2img_sigmas(sigmas, strength, steps)
    run = sdedit_sigmas(sigmas, strength)
    return run[0], run


def img2img_start(grid: str, z0: torch.Tensor, noise: torch.Tensor, start_sigma: torch.Tensor,
                  sigmas: torch.Tensor) -> torch.Tensor:
    """Sampler input of img2img: the init latents ``z0`` (B, C, h, w) noised to ``start_sigma``, as the sampler
    variable at ``sigmas[0]`` (the grid :func:`img2img_sigmas` returned)."""
    if grid == "ddim":
        # CV DDIMSampler.stochastic_encode in VP space, then the sampler's VE variable at the grid's start
        z_enc = schedules.compvis_stochastic_encode(z0, noise, start_sigma)
        return schedules.vp_to_ve(z_enc, sigmas[0])
    return schedules.sgm_img2img_start(z0, noise, torch.as_tensor(start_sigma))


# ----------------------------------------------------------------------------- SDXL base -> refiner hand-over


def check_high_noise_frac(high_noise_frac: float) -> None:
    if not 0.0 < float(high_noise_frac) < 1.0:
        raise SdgenError(
            f"--high-noise-frac must be strictly between 0 and 1 (the base's share of the noise range), got "
            f"{high_noise_frac}"
        )


def handover_cutoff(high_noise_frac: float, num_timesteps: int = 1000) -> int:
    """First training timestep left to the refiner: the base runs t >= cutoff (diffusers ``denoising_end``:
    ``int(round(N - high_noise_frac * N))``, 200 for 0.8)."""
    check_high_noise_frac(high_noise_frac)
    return int(round(num_timesteps - high_noise_frac * num_timesteps))


def grid_timesteps(sigmas: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Training index of each nonzero grid sigma (nearest table entry, as the denoiser quantises)."""
    s = sigmas[sigmas > 0].to(table.dtype)
    return (s[:, None] - table[None, :].to(s.device)).abs().argmin(dim=1)


def split_sigmas(
    sigmas: torch.Tensor, table: torch.Tensor, high_noise_frac: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a descending grid (ending in 0) between base and refiner at the hand-over sigma (SDXL model card's
    "ensemble of expert denoisers", diffusers ``denoising_end``).

    The base gets the entries whose timestep is >= :func:`handover_cutoff` plus the next sigma (where it
    stops); the refiner starts at that same sigma: ``base[-1] == refiner[0]``. 50 steps on the "sgm" grid
    with 0.8: the base runs 40 steps, t = 999 ... 219, and hands over at t = 199 (sigma 0.5693); the refiner
    runs the 10 steps t = 199 ... 19 to 0. On the 0.9 grid (t = 981 ... 1): 40 + 10 steps, hand-over at t = 181.

    Raises:
        SdgenError: the split leaves the base or the refiner without a step (too few steps for the fraction).
    """
    cutoff = handover_cutoff(high_noise_frac, len(table))
    t = grid_timesteps(sigmas, table)
    k = int((t >= cutoff).sum())
    steps = len(sigmas) - 1
    if k == 0:
        raise SdgenError(
            f"--high-noise-frac {high_noise_frac} with {steps} steps leaves the base no step (its first timestep "
            f"{int(t[0])} is below the hand-over timestep {cutoff}); raise --high-noise-frac or --steps"
        )
    if k >= steps:
        raise SdgenError(
            f"--high-noise-frac {high_noise_frac} with {steps} steps leaves the refiner no step (every timestep "
            f"is >= the hand-over timestep {cutoff}); lower --high-noise-frac or raise --steps"
        )
    return sigmas[: k + 1], sigmas[k:]
