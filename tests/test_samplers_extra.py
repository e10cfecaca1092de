"""The DPM++ family, LMS and UniPC on the analytic Gaussian denoiser; Brownian noise; the extra schedules.

Data x0 ~ N(MU, S^2) per element has the exact denoiser D(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2) and
the exact probability-flow map x(0) = MU + (x_T - MU) S / sqrt(S^2 + sigma_max^2). Runs start from
quantile-spaced points of N(MU, S^2 + sigma_max^2) on a Karras grid from sigma_max 80. Tensors stay below 32768
elements. Values reached (measured when written):

    ODE, karras 40 steps to sigma_min 0.002, then 0 (max |x - exact|):
      lms 9.2e-3, unipc 9.0e-3, 3M (eta 0) 3.3e-3, 2M SDE (eta 0) midpoint 2.7e-2 / heun 3.9e-2,
      DPM++ SDE / 2S ancestral (eta 0) 1.3e-2
    error ratio when the steps double (karras to sigma_min, no final jump):
      lms 13.0 (50 -> 100), unipc 8.4, 2M SDE (eta 0) 4.3 / 4.4, DPM++ SDE / 2S (eta 0) 4.0;
      3M (eta 0) 3.6 (100 -> 200; the published d2 weight makes it second order)
    SDE, karras 50 steps, 8192 samples, Brownian noise (2S ancestral: per-image draws):
      |mean - MU| <= 0.012 (4 s.e.: 0.035), variance / S^2 within 0.066 of 1 (bound 0.1)
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.errors import SdgenError
from ldm.sampling import grids, schedules
from ldm.sampling import samplers as smp
from ldm.sampling.noise import (
    SDE_SAMPLERS,
    BatchedNoiseSampler,
    BrownianTreeNoiseSampler,
    image_seeds,
    initial_noise,
    make_generators,
    noise_sampler_for,
)
from tests.test_samplers_analytic import ACP, MU, TABLE, S, exact_denoiser, quantile_points

SIGMA_MAX = 80.0
NEW = ["dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "lms", "unipc"]


def start(z: torch.Tensor) -> torch.Tensor:
    return MU + math.sqrt(S**2 + SIGMA_MAX**2) * z


def exact_flow(x_start: torch.Tensor, sigma_end: float) -> torch.Tensor:
    return MU + (x_start - MU) * math.sqrt((S**2 + sigma_end**2) / (S**2 + SIGMA_MAX**2))


def karras(steps: int, to_zero: bool = True) -> torch.Tensor:
    sigmas = schedules.karras_sigmas(steps, 0.002, SIGMA_MAX, dtype=torch.float64)
    return sigmas if to_zero else sigmas[:-1]


def test_the_table_lists_the_new_samplers():
    for name in NEW:
        assert smp.SAMPLERS[name] is getattr(smp, f"sample_{name}")
        assert f"sample_{name}" in smp.__all__
        assert grids.DEFAULT_GRID[name] in grids.GRIDS
    assert set(SDE_SAMPLERS) == {"dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"}


# ---------------------------------------------------------------------------------------------------------------
# the probability-flow ODE: accuracy and order
# ---------------------------------------------------------------------------------------------------------------

ODE = [
    # sampler, options, max error at 40 steps, error ratio when the steps double, (n, 2n)
    ("lms", {}, 1.5e-2, 10.0, 50),
    ("unipc", {}, 1.5e-2, 6.0, 50),
    ("dpmpp_2m_sde", {"eta": 0.0}, 4e-2, 3.0, 50),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 6e-2, 3.0, 50),
    ("dpmpp_3m_sde", {"eta": 0.0}, 6e-3, 3.0, 100),
    ("dpmpp_sde", {"eta": 0.0}, 2e-2, 3.0, 50),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2e-2, 3.0, 50),
]


@pytest.mark.parametrize("name,options,tol,ratio,n", ODE)
def test_deterministic_samplers_solve_the_flow(name, options, tol, ratio, n):
    x0 = start(quantile_points(4096))
    out = smp.SAMPLERS[name](exact_denoiser, x0, karras(40), **options)
    assert float((out - exact_flow(x0, 0.0)).abs().max()) < tol
    assert abs(float(out.mean()) - MU) < 1e-9  # every step is affine with the exact mean fixed

    x0 = x0[:, :16]
    errors = []
    for steps in (n, 2 * n):
        sigmas = karras(steps, to_zero=False)
        out = smp.SAMPLERS[name](exact_denoiser, x0, sigmas, **options)
        errors.append(float((out - exact_flow(x0, float(sigmas[-1]))).abs().max()))
    assert errors[0] / errors[1] >= ratio, errors


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    x0 = start(quantile_points(400))
    sigmas = karras(20)
    ode = smp.sample_dpmpp_2m_sde(exact_denoiser, x0, sigmas, eta=0.0)
    assert torch.allclose(ode, smp.sample_dpmpp_2m(exact_denoiser, x0, sigmas, lower_order_final=False), atol=1e-12)
    # and DPM++ SDE without noise is DPM++ 2S without noise (r = 1/2: both evaluate D at the geometric mean)
    a = smp.sample_dpmpp_sde(exact_denoiser, x0, sigmas, eta=0.0)
    b = smp.sample_dpmpp_2s_ancestral(exact_denoiser, x0, sigmas, eta=0.0)
    assert torch.allclose(a, b, atol=1e-12)


def test_lms_coefficients_are_adams_bashforth_on_an_even_grid():
    assert smp.lms_coefficients([0.0], 0.0, 1.0) == pytest.approx([1.0])
    assert smp.lms_coefficients([0.0, -1.0], 0.0, 1.0) == pytest.approx([1.5, -0.5])
    assert smp.lms_coefficients([0.0, -1.0, -2.0], 0.0, 1.0) == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    ab4 = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    assert smp.lms_coefficients([0.0, -1.0, -2.0, -3.0], 0.0, 1.0) == pytest.approx(ab4, rel=1e-12)
    # a descending sigma grid: the basis integrals sum to the step
    coeffs = smp.lms_coefficients([3.0, 5.5, 9.0, 14.0], 3.0, 1.2)
    assert sum(coeffs) == pytest.approx(1.2 - 3.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# the SDE samplers: distribution, Brownian noise, batch invariance
# ---------------------------------------------------------------------------------------------------------------

STOCHASTIC = [
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_sde", {}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_2s_ancestral", {}),
]


@pytest.mark.parametrize("name,options", STOCHASTIC)
def test_stochastic_samplers_reach_the_data_distribution(name, options):
    z = quantile_points(8192)
    sigmas = karras(50)
    noise = noise_sampler_for(name, image_seeds(0, 4), z.shape[1:], sigmas, dtype=torch.float64)
    out = smp.SAMPLERS[name](exact_denoiser, start(z), sigmas, noise_sampler=noise, **options)
    n = out.numel()
    assert abs(float(out.mean()) - MU) < 4 * S / math.sqrt(n)
    assert abs(float(out.var()) / S**2 - 1) < 0.1


def test_dpmpp_sde_is_unbiased_with_independent_draws_too():
    """Its two noises are built from adjacent increments, so per-image draws give the Brownian correlation."""
    z = quantile_points(8192)
    sigmas = karras(50)
    noise = BatchedNoiseSampler(image_seeds(0, 4), z.shape[1:], dtype=torch.float64)
    out = smp.sample_dpmpp_sde(exact_denoiser, start(z), sigmas, noise_sampler=noise)
    assert abs(float(out.var()) / S**2 - 1) < 0.1


@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_sde_samplers_are_batch_invariant(name):
    seeds, shape = [7, 8, 9], (2, 6, 6)
    sigmas = grids.sampler_sigmas(name, ACP, 12)
    x = grids.initial_x(initial_noise(shape, seeds), sigmas)
    batch = smp.SAMPLERS[name](exact_denoiser, x, sigmas,
                               noise_sampler=noise_sampler_for(name, seeds, shape, sigmas, "cpu", torch.float32, None))
    for i, seed in enumerate(seeds):
        noise = BrownianTreeNoiseSampler([seed], shape, sigmas)
        alone = smp.SAMPLERS[name](exact_denoiser, x[i:i + 1], sigmas, noise_sampler=noise)
        assert torch.equal(batch[i:i + 1], alone)
    other = smp.SAMPLERS[name](exact_denoiser, x, sigmas, noise_sampler=BrownianTreeNoiseSampler([1, 2, 3], shape, sigmas))
    assert not torch.allclose(other, batch)


def test_brownian_noise_is_one_path_on_any_grid():
    coarse, fine = grids.grid_sigmas("karras", ACP, 10), grids.grid_sigmas("karras", ACP, 40)
    a = BrownianTreeNoiseSampler([5, 6], (500,), coarse)
    b = BrownianTreeNoiseSampler([5, 6], (500,), fine)

    def path(sampler, grid):  # W(sigma_min) - W(sigma_max) from the steps' normalised increments
        return sum(sampler(grid[i], grid[i + 1]) * (grid[i] - grid[i + 1]).sqrt() for i in range(len(grid) - 2))

    total_a, total_b = path(a, coarse), path(b, fine)
    assert torch.allclose(total_a, total_b, rtol=0, atol=1e-4)
    assert float(total_a.std()) == pytest.approx(math.sqrt(float(coarse[0] - coarse[-2])), rel=0.1)
    # additivity within a step, and the sign of the increment
    s0, s1, s2 = (torch.tensor(v) for v in (9.0, 4.0, 1.0))
    whole = a(s0, s2) * (s0 - s2).sqrt()
    parts = a(s0, s1) * (s0 - s1).sqrt() + a(s1, s2) * (s1 - s2).sqrt()
    assert torch.allclose(whole, parts, atol=1e-5)
    assert torch.allclose(a(s2, s0), -a(s0, s2))
    step = a(coarse[0], coarse[1])
    assert step.shape == (2, 500) and step.dtype == torch.float32
    assert abs(float(step.std()) - 1) < 0.1


def test_noise_sampler_for_picks_the_kind():
    seeds, shape = [3, 4], (2, 3, 3)
    sigmas = grids.sampler_sigmas("euler", ACP, 8)
    for name in SDE_SAMPLERS:
        assert isinstance(noise_sampler_for(name, seeds, shape, [sigmas[:5], sigmas[4:]]), BrownianTreeNoiseSampler)
    for name in ("euler_ancestral", "dpmpp_2s_ancestral", "ddim"):
        gens = make_generators(seeds)
        initial_noise(shape, seeds, generators=gens)
        sampler = noise_sampler_for(name, seeds, shape, sigmas, "cpu", torch.float32, gens)
        assert isinstance(sampler, BatchedNoiseSampler)
        expected = BatchedNoiseSampler(seeds, shape)(None, None)  # fresh streams past the initial draw
        assert torch.equal(sampler(sigmas[0], sigmas[1]), expected)
    # the stages' grids together span the tree: the refiner's steps are part of the same path
    tree = noise_sampler_for("dpmpp_2m_sde", seeds, shape, [sigmas[:5], sigmas[4:]])
    assert tree.t0 <= float(sigmas[-2]) and tree.t1 >= float(sigmas[0])


# ---------------------------------------------------------------------------------------------------------------
# callbacks, grids that end at 0, errors
# ---------------------------------------------------------------------------------------------------------------

CALLS_PER_STEP = {"dpmpp_sde": 2, "dpmpp_2s_ancestral": 2}


@pytest.mark.parametrize("name", NEW)
def test_callback_once_per_step_and_a_plain_last_step(name):
    events = []

    def den(x, sigma, cond=None):
        events.append("D")
        return exact_denoiser(x, sigma)

    sigmas = grids.sampler_sigmas(name, ACP, 7).double()
    assert float(sigmas[-1]) == 0.0
    x = start(quantile_points(8, rows=2))
    noise = noise_sampler_for(name, [0, 1], x.shape[1:], sigmas, dtype=torch.float64)
    out = smp.SAMPLERS[name](den, x, sigmas, noise_sampler=noise, callback=lambda info: events.append(info["i"]))
    steps = [e for e in events if e != "D"]
    assert steps == list(range(len(sigmas) - 1))
    per_step = CALLS_PER_STEP.get(name, 1)
    assert events.count("D") == per_step * (len(sigmas) - 2) + 1  # the step to 0 evaluates once
    assert events[-1] == len(sigmas) - 2 and events[-2] == "D"
    assert torch.isfinite(out).all()


def test_sampler_option_errors():
    sigmas = karras(5)
    x = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(SdgenError, match="solver_type"):
        smp.sample_dpmpp_2m_sde(exact_denoiser, x, sigmas, solver_type="rk4")
    for name in SDE_SAMPLERS + ("dpmpp_2s_ancestral",):
        with pytest.raises(SdgenError, match="noise_sampler"):
            smp.SAMPLERS[name](exact_denoiser, x, sigmas)
    with pytest.raises(SdgenError):
        smp.sample_unipc(exact_denoiser, x, sigmas, order=3)
    with pytest.raises(SdgenError):
        smp.sample_lms(exact_denoiser, x, sigmas, order=0)


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_exponential_grid(steps):
    sigmas = grids.grid_sigmas("exponential", ACP, steps, dtype=torch.float64)
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert float(sigmas[0]) == pytest.approx(float(TABLE[-1]), rel=1e-12)
    if steps > 1:
        assert float(sigmas[-2]) == pytest.approx(float(TABLE[0]), rel=1e-12)
        ratios = sigmas[1:-1] / sigmas[:-2]  # log-linear: a constant ratio
        assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    assert grids.grid_sigmas("exponential", ACP, steps).dtype == torch.float32
    assert grids.time_mode("exponential") == "interpolate"


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_sgm_uniform_grid(steps):
    sigmas = grids.grid_sigmas("sgm_uniform", ACP, steps, dtype=torch.float64)
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert float(sigmas[0]) == pytest.approx(float(TABLE[-1]), rel=1e-12)  # t = 999
    # the last nonzero entry is at t = 999 / steps (the linspace's next-to-last point), log sigma interpolated
    t = 999 / steps
    lo, w = int(math.floor(t)), t - math.floor(t)
    expect = math.exp((1 - w) * math.log(float(TABLE[lo])) + w * math.log(float(TABLE[min(lo + 1, 999)])))
    assert float(sigmas[-2]) == pytest.approx(expect, rel=1e-12)
    if steps == 10:  # t = 999, 899.1, ..., 99.9
        assert float(sigmas[1]) == pytest.approx(
            math.exp(0.9 * math.log(float(TABLE[899])) + 0.1 * math.log(float(TABLE[900]))), rel=1e-12)
    assert grids.time_mode("sgm_uniform") == "interpolate"


def test_schedule_grid():
    assert grids.SCHEDULES == ("default", "karras", "exponential", "sgm_uniform")
    for name in smp.SAMPLERS:
        assert grids.schedule_grid("default", name, None) == grids.DEFAULT_GRID[name]
    assert grids.schedule_grid("default", "euler", "sgm_legacy") == "sgm_legacy"
    assert grids.schedule_grid("default", "ddim", "sgm") == "sgm"
    for schedule in ("karras", "exponential", "sgm_uniform"):
        assert grids.schedule_grid(schedule, "dpmpp_2m_sde", None) == schedule
        assert grids.schedule_grid(schedule, "unipc", "sgm") == schedule
        for name in ("ddim", "plms"):
            with pytest.raises(SdgenError, match=name):
                grids.schedule_grid(schedule, name, None)
    with pytest.raises(SdgenError, match="unknown schedule"):
        grids.schedule_grid("polyexponential", "euler", None)
    with pytest.raises(SdgenError, match="unknown sampler"):
        grids.schedule_grid("karras", "dpm_fast", None)
