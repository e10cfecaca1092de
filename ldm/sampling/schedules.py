"""Noise schedules and sampling grids.

Samplers run in the variance-exploding ("VE", k-diffusion) space: ``x = x_t / sqrt(alphabar_t)`` with noise
level ``sigma = sqrt((1 - alphabar) / alphabar)``. This module holds everything that turns a DDPM training
schedule into a descending tensor of sigmas:

- the training schedule (``make_beta_schedule``, ``alphas_cumprod_from_betas``, ``sigmas_from_alphas_cumprod``),
- the grids of the original samplers: the CompVis DDIM/PLMS grid, the CompVis DPM-Solver time-uniform grid,
  the SGM ``LegacyDDPMDiscretization`` (current and 0.9-release spacing), k-diffusion's linspace-in-t grid,
  Karras et al. sigmas, k-diffusion's exponential (log-linear) sigmas and ComfyUI's sgm_uniform grid,
- img2img truncation (CompVis ``scripts/img2img.py`` and SGM's pruning of the grid),
- the VP <-> VE conversions of the latent (``vp_to_ve`` / ``ve_to_vp``).

Every grid is returned as a float32 tensor ``(n + 1,)``, descending, whose last entry is where sampling ends:
0 for the k-diffusion / SGM grids, ``sigma(alphabar[0])`` ~ 0.0292 for the CompVis DDIM and DPM-Solver grids
(the originals stop there and decode that latent).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ldm.errors import SdgenError

# ---------------------------------------------------------------------------------------------------------------
# training schedule
# ---------------------------------------------------------------------------------------------------------------


def _betas_for_alpha_bar(n: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas of a schedule given as a continuous alphabar(t), t in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """DDPM betas (float64, shape (n_timestep,)), as CV/SGM ``ldm/modules/diffusionmodules/util.py`` names them.

    - ``"linear"``: ``linspace(sqrt(start), sqrt(end), n)**2`` (what diffusers calls "scaled_linear"; SD 1/2/XL).
    - ``"sqrt_linear"``: plain ``linspace(start, end, n)``; ``"sqrt"``: its square root.
    - ``"cosine"``: improved-DDPM cosine schedule with offset ``cosine_s``, betas clipped to 0.999.
    - ``"squaredcos_cap_v2"``: the cosine alphabar ``cos((t + 0.008) / 1.008 * pi/2)**2`` discretised with
      ``betas_for_alpha_bar`` (the unCLIP / Karlo noise augmentor).
    The linspaces are torch float64 linspaces, as in the originals, so the bits agree with their buffers.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise SdgenError(f"unknown beta schedule {schedule!r} (linear, cosine, squaredcos_cap_v2, sqrt_linear, sqrt)")
    return betas.numpy()


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alphabar_t = prod_{s<=t} (1 - beta_s), float64 numpy (CV ddpm.py ``register_schedule``)."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)


def _as_float64(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(values), dtype=torch.float64)


def sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """Training sigmas ``sqrt((1 - alphabar) / alphabar)`` (ascending, index = DDPM t), float64 on the CPU.

    Computed in float64 from the given values (for ldm models: the model's float32 ``alphas_cumprod`` buffer,
    from which the original samplers take their alphas).
    """
    a = _as_float64(alphas_cumprod)
    return ((1 - a) / a).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# VP <-> VE
# ---------------------------------------------------------------------------------------------------------------


def vp_to_ve(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """VP latent x_t (unit-variance noise scale, what ldm/SGM hold) -> sampler variable x_t * sqrt(1 + sigma^2).

    With ``x`` = unit noise and ``sigma`` the first grid entry this is the initial sampler input of the
    originals (SGM ``prepare_sampling_loop``: ``x *= sqrt(1 + sigmas[0]**2)``; CompVis starts from unit noise
    in x_t space, which is the same point). k-diffusion's own scripts instead scale noise by ``sigma_max``.
    ``sigma`` is a scalar (float or 0-d tensor, float32 like the grids).
    """
    s = torch.as_tensor(sigma, dtype=torch.float32) if not isinstance(sigma, torch.Tensor) else sigma
    return x * torch.sqrt(1.0 + s.to(x.device) ** 2.0)


def ve_to_vp(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Sampler variable at noise level ``sigma`` -> VP latent x / sqrt(1 + sigma^2) (identity at sigma 0).

    Apply to a sampler's result with ``sigma = sigmas[-1]``: the CompVis grids end at sigma(alphabar[0]) and
    the originals decode the latent at that level.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32) if not isinstance(sigma, torch.Tensor) else sigma
    return x / torch.sqrt(1.0 + s.to(x.device) ** 2.0)


# ---------------------------------------------------------------------------------------------------------------
# CompVis DDIM / PLMS grid
# ---------------------------------------------------------------------------------------------------------------


def check_step_count(steps: int, grid: str, most: int | None = None) -> None:
    """Refuse a step count below 1 (every grid) or above ``most`` (the integer-timestep grids: at most the N
    training timesteps) with one SdgenError line."""
    if steps < 1 or (most is not None and steps > most):
        bounds = f"1..{most}" if most is not None else "at least 1"
        raise SdgenError(f"the {grid} grid takes {bounds} steps, got {steps}")


def _shifted_uniform_timesteps(
    steps: int, num_timesteps: int, what: str, origin: str, usable: tuple[int, ...] = ()
) -> np.ndarray:
    """``range(0, N, N // steps) + 1`` (int64, ascending): the CompVis DDIM "uniform" grid and SGM's 0.9-release
    "legacy LDM hack". When the stride divides N - 1 the +1 shift reaches t = N, one past the training table
    (the originals fail with an IndexError): refused, naming the two nearest counts that work. ``what`` and
    ``origin`` word the message ("DDIM steps", "CompVis"); ``usable``: counts above N/2 that the caller
    handles otherwise."""
    t = np.arange(0, num_timesteps, num_timesteps // steps, dtype=np.int64) + 1
    if t[-1] < num_timesteps:
        return t
    ok = [s for s in range(1, num_timesteps // 2 + 1) if (num_timesteps - 1) % (num_timesteps // s) != 0]
    near = sorted([*ok, *usable], key=lambda s: (abs(s - steps), s))[:2]
    raise SdgenError(
        f"{steps} {what} would put the last {origin} timestep at t={num_timesteps} (the original fails here); "
        f"use e.g. {' or '.join(map(str, sorted(near)))} steps"
    )


def ddim_timesteps(steps: int, num_timesteps: int = 1000, method: str = "uniform") -> np.ndarray:
    """CompVis ``make_ddim_timesteps`` (CV ldm/modules/diffusionmodules/util.py), ascending int64.

    ``"uniform"``: ``range(0, N, N // steps) + 1`` -- when ``steps`` does not divide N this yields more than
    ``steps`` entries (S=7 -> 8, S=30 -> 31), as the original does. Step counts whose stride divides N - 1
    (S = 3, 9, 27, 37, 111, > N/2, ...) would need t = N, where the original fails: they are refused.
    ``"quad"``: ``(linspace(0, sqrt(0.8 N), steps)**2).astype(int) + 1``.
    """
    check_step_count(steps, "DDIM", num_timesteps)
    if method == "uniform":
        return _shifted_uniform_timesteps(steps, num_timesteps, "DDIM steps", "CompVis")
    if method == "quad":
        t = ((np.linspace(0, np.sqrt(num_timesteps * 0.8), steps)) ** 2).astype(int)
        return (t + 1).astype(np.int64)
    raise SdgenError(f"unknown DDIM discretization {method!r} (uniform, quad)")


def ddim_alphas(alphas_cumprod, timesteps: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, alphas_prev) of CompVis ``make_ddim_sampling_parameters`` for ascending ``timesteps``.

    alphas = alphabar[t_i]; alphas_prev = [alphabar[0]] + alphabar[t_{i-1}]: the last step goes to alphabar[0]
    (0.99915), not to 1. Same dtype as ``alphas_cumprod`` (float32 for a model's buffer).
    """
    acp = torch.as_tensor(alphas_cumprod)
    idx = torch.as_tensor(np.asarray(timesteps), dtype=torch.long)
    alphas = acp[idx]
    alphas_prev = torch.cat([acp[:1], acp[idx[:-1]]])
    return alphas, alphas_prev


def ddim_sigmas(
    alphas_cumprod, steps: int, method: str = "uniform", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The CompVis DDIM/PLMS grid as descending sigmas ``(len(timesteps) + 1,)`` (float32 unless ``dtype``).

    ``sigma(t)`` for the reversed ``ddim_timesteps`` (901 ... 1 for S=10), then ``sigma(alphabar[0])`` where
    the original's last step ends. With ``time_mode="integer"`` the denoiser maps each back to its exact t.
    """
    table = sigmas_from_alphas_cumprod(alphas_cumprod)
    t = torch.as_tensor(ddim_timesteps(steps, len(table), method)).flip(0)
    return torch.cat([table[t], table[:1]]).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# CompVis DPM-Solver (discrete VP schedule in continuous time)
# ---------------------------------------------------------------------------------------------------------------


def _log_alpha_table(alphas_cumprod) -> torch.Tensor:
    """log alpha_n = 0.5 * log(alphabar_n), float64 (CV dpm_solver.py ``NoiseScheduleVP('discrete')``)."""
    return 0.5 * torch.log(_as_float64(alphas_cumprod))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through ascending keypoints (xp, fp), extended linearly past both ends.

    Same function as CV dpm_solver.py ``interpolate_fn`` (which extrapolates with the outermost segments).
    """
    k = xp.shape[0]
    hi = torch.searchsorted(xp, x.contiguous(), right=False).clamp(1, k - 1)
    lo = hi - 1
    x0, x1, y0, y1 = xp[lo], xp[hi], fp[lo], fp[hi]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def vp_time_to_sigma(t_cont: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """Continuous DPM-Solver time t in [1/N, 1] -> VE sigma, float64.

    The discrete schedule is continued by linear interpolation of log alpha over t_n = (n + 1) / N.
    """
    log_alpha = _log_alpha_table(alphas_cumprod)
    n = log_alpha.shape[0]
    t_array = torch.arange(1, n + 1, dtype=torch.float64) / n
    la = _interp(_as_float64(t_cont).reshape(-1), t_array, log_alpha)
    return torch.sqrt(torch.expm1(-2.0 * la))


def sigma_to_vp_time(sigma: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """Inverse of :func:`vp_time_to_sigma`: VE sigma -> continuous time t (float64, shape of ``sigma``).

    log alpha = -0.5 * log(1 + sigma^2), then t from the piecewise-linear log alpha(t) (CV ``inverse_lambda``).
    The network time of CompVis DPM-Solver is ``(t - 1/N) * 1000``.
    """
    log_alpha_tab = _log_alpha_table(alphas_cumprod)
    n = log_alpha_tab.shape[0]
    t_array = torch.arange(1, n + 1, dtype=torch.float64) / n
    s = _as_float64(sigma)
    la = -0.5 * torch.log1p(s.reshape(-1) ** 2)
    t = _interp(la, log_alpha_tab.flip(0), t_array.flip(0))
    return t.reshape(s.shape)


def dpm_solver_sigmas(
    alphas_cumprod, steps: int, skip_type: str = "time_uniform", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The grid of CompVis ``--dpm_solver`` (CV dpm_solver.py ``get_time_steps``), descending (float32 default).

    ``time_uniform``: t = linspace(1, 1/N, steps + 1) (in ``dtype``; float32 as in the original), mapped to
    sigmas through the discrete VP schedule; the grid ends at t = 1/N, i.e. sigma(alphabar[0]). ``logSNR``:
    uniform in lambda = -log sigma between the same end points.
    """
    check_step_count(steps, "dpm_solver")
    n = len(alphas_cumprod)
    if skip_type == "time_uniform":
        t = torch.linspace(1.0, 1.0 / n, steps + 1, dtype=dtype)
        return vp_time_to_sigma(t, alphas_cumprod).to(dtype)
    if skip_type == "logSNR":
        ends = vp_time_to_sigma(torch.tensor([1.0, 1.0 / n], dtype=torch.float64), alphas_cumprod)
        lam = torch.linspace(float(-ends[0].log()), float(-ends[1].log()), steps + 1, dtype=torch.float64)
        return torch.exp(-lam).to(dtype)
    raise SdgenError(f"unknown DPM-Solver skip type {skip_type!r} (time_uniform, logSNR)")


# ---------------------------------------------------------------------------------------------------------------
# SGM LegacyDDPMDiscretization
# ---------------------------------------------------------------------------------------------------------------


def sgm_timesteps(n: int, num_timesteps: int = 1000, legacy_range: bool = False) -> np.ndarray:
    """Ascending DDPM indices of SGM ``LegacyDDPMDiscretization.get_sigmas`` for ``n`` in 1..N steps.

    ``n == N`` is the whole table. Current SGM (since e9869d7): ``linspace(N-1, 0, n, endpoint=False)
    .astype(int)[::-1]`` (99, 199, ..., 999 for n=10). 0.9 release (081e0d4, ``legacy_range=True``):
    ``range(0, N, N // n) + 1`` (1, 101, ..., 901), which like CompVis gives more than n entries when n does not
    divide N, and is refused where it would reach t = N (n = 3, 9, 37, N/2 < n < N, ...).
    """
    grid = "sgm_legacy" if legacy_range else "sgm"
    check_step_count(n, grid, num_timesteps)
    if n == num_timesteps:
        return np.arange(num_timesteps, dtype=np.int64)
    if legacy_range:
        return _shifted_uniform_timesteps(
            n, num_timesteps, "steps on the sgm_legacy grid", "SGM 0.9", (num_timesteps,)
        )
    return np.linspace(num_timesteps - 1, 0, n, endpoint=False).astype(int)[::-1].astype(np.int64)


def sgm_sigmas(alphas_cumprod, timesteps) -> torch.Tensor:
    """Ascending float32 sigmas at ``timesteps`` with SGM's operation order: the ratio (1 - a) / a in float64,
    cast to float32, square root in float32 (this order matters in the last bit: it is how the SGM
    ``denoiser.sigmas`` buffer and sampling grids are computed)."""
    a = _as_float64(alphas_cumprod).numpy()[np.asarray(timesteps, dtype=np.int64)]
    return torch.tensor((1 - a) / a, dtype=torch.float32) ** 0.5


def sgm_grid(alphas_cumprod, steps: int, legacy_range: bool = False) -> torch.Tensor:
    """Descending SGM sampling grid (see :func:`sgm_timesteps`) plus the final 0, float32 (steps + 1,)."""
    sigmas = torch.flip(sgm_sigmas(alphas_cumprod, sgm_timesteps(steps, len(alphas_cumprod), legacy_range)), (0,))
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class LegacyDDPMDiscretization:
    """SGM ``LegacyDDPMDiscretization``: ``disc(n) -> descending float32 sigmas (n + 1,)`` ending in 0.

    Betas are the ldm "linear" schedule in float64; sigmas are ``float32((1 - a) / a) ** 0.5`` (ratio in float64,
    cast, square root in float32: the SGM operation order, so the values equal its ``denoiser.sigmas`` buffer).
    ``disc(n, do_append_zero=True, flip=False)``: ``flip=True`` returns ascending order (the training table for
    ``n = num_timesteps``). ``legacy_range`` selects the 0.9-release spacing (see :func:`sgm_timesteps`).
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        num_timesteps: int = 1000,
        legacy_range: bool = False,
    ) -> None:
        self.num_timesteps = num_timesteps
        self.legacy_range = legacy_range
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)

    def timesteps(self, n: int) -> np.ndarray:
        """Ascending DDPM indices of an ``n``-step grid (raises SdgenError for a count the grid refuses)."""
        return sgm_timesteps(n, self.num_timesteps, self.legacy_range)

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Descending float32 sigmas of the ``n``-step grid, without the final 0."""
        return torch.flip(sgm_sigmas(self.alphas_cumprod, self.timesteps(n)), (0,)).to(device)

    def __call__(
        self, n: int, do_append_zero: bool = True, device: torch.device | str = "cpu", flip: bool = False
    ) -> torch.Tensor:
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        return torch.flip(sigmas, (0,)) if flip else sigmas


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion grids
# ---------------------------------------------------------------------------------------------------------------


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Karras et al. 2022 eq. 5: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``, then 0 appended."""
    check_step_count(n, "karras")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(dtype)


def _table_sigmas_at(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sigma at fractional training times t (float64): log sigma linear between integer t (k-diffusion
    ``t_to_sigma``, the "interpolate" time mode)."""
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def linspace_t_sigmas(alphas_cumprod, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """k-diffusion ``DiscreteSchedule.get_sigmas``: t = linspace(N-1, 0, n), log-sigma interpolated, then 0."""
    check_step_count(n, "linspace_t")
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n, dtype=torch.float64)
    sigmas = _table_sigmas_at(log_sigmas, t)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(dtype)


def exponential_sigmas(
    n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """k-diffusion ``get_sigmas_exponential``: n sigmas evenly spaced in log sigma from sigma_max down to
    sigma_min, then 0 appended (computed in float64)."""
    check_step_count(n, "exponential")
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(dtype)


def sgm_uniform_sigmas(alphas_cumprod, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ComfyUI's "sgm_uniform" schedule: t = linspace(N-1, 0, n + 1) without its last point (t = 0), each
    sigma interpolated in the table as in :func:`linspace_t_sigmas`, then 0 (computed in float64)."""
    check_step_count(n, "sgm_uniform")
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, n + 1, dtype=torch.float64)[:-1]
    sigmas = _table_sigmas_at(log_sigmas, t)
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# img2img truncation
# ---------------------------------------------------------------------------------------------------------------


def compvis_img2img_sigmas(sigmas: torch.Tensor, strength: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CompVis ``scripts/img2img.py`` truncation of a DDIM grid (:func:`ddim_sigmas`).

    ``t_enc = int(strength * steps)`` with the *requested* ``steps``. The init latent is noised at DDIM index
    ``t_enc`` (``stochastic_encode``) but denoising starts at index ``t_enc - 1`` (``decode`` runs
    ``timesteps[:t_enc]`` reversed): an off-by-one of the original, kept. For S=10, strength 0.5: noise at
    t=501, run 401, 301, 201, 101, 1.

    Returns ``(sigma_noise, run_sigmas)``: the noise level to encode at and the descending grid to sample
    (``t_enc`` steps plus the final entry). Noise the latent with :func:`compvis_stochastic_encode` and start
    the sampler from ``vp_to_ve(z_enc, run_sigmas[0])``.
    """
    if not 0.0 <= strength <= 1.0:
        raise SdgenError(f"img2img strength must be in [0, 1], got {strength}")
    n = len(sigmas) - 1
    t_enc = int(strength * steps)
    if t_enc >= n:
        raise SdgenError(
            f"img2img strength {strength} with {steps} DDIM steps encodes past the last DDIM step "
            f"(t_enc={t_enc}); the original fails here too -- use a strength below 1"
        )
    return sigmas[n - 1 - t_enc], sigmas[n - t_enc:]


def compvis_stochastic_encode(z0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """CV ``DDIMSampler.stochastic_encode``: ``sqrt(a) z0 + sqrt(1 - a) noise`` with a = 1 / (1 + sigma^2) (VP)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    a = 1.0 / (1.0 + s**2)
    return z0 * float(a.sqrt()) + noise * float((1 - a).sqrt())


def sgm_img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """SGM img2img pruning (``Img2ImgDiscretizationWrapper``): the ``max(int(strength * len), 1)`` lowest entries
    of a descending grid (its final 0 counted). 50 steps at strength 0.15 keep [sigma(119) ... sigma(19), 0]:
    6 Euler steps from sigma(119) (SGM ``scripts/demo/discretization.py``; facts 4.7)."""
    if not 0.0 <= strength <= 1.0:
        raise SdgenError(f"strength must be in [0, 1], got {strength}")
    ascending = torch.flip(sigmas, (0,))
    return torch.flip(ascending[: max(int(strength * len(ascending)), 1)], (0,))


def sgm_img2img_start(z: torch.Tensor, noise: torch.Tensor | None, sigma0: torch.Tensor) -> torch.Tensor:
    """Sampler input of SGM ``do_img2img`` (VE): ``z + noise * sigma0``, or ``z`` itself with ``noise=None``.

    The original divides by sqrt(1 + sigma0^2) and its sampling loop multiplies back; the refiner hand-over
    with "finish denoising" passes the base's noisy latent without adding noise (``add_noise=False``).
    """
    if noise is None:
        return z.clone()
    return z + noise * sigma0.to(z.device, z.dtype)
