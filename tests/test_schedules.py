"""Schedules and sampling grids (ldm.sampling.schedules) against the originals' numbers.

References come from the golden buffers (tests/data/golden, made on another CPU: compared through
tests/tolerance.py) and from the original formulas written out here and run on this machine, which must agree
bit for bit where the original's rounding is the point (the SGM discretization); the other numbers were computed
from the original formulas (CompVis ddim/img2img, SGM discretizer and demo wrappers, k-diffusion).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.errors import SdgenError
from ldm.sampling import grids, schedules
from tests.golden import case_data, case_state_dict
from tests.tolerance import COSINE_SCHEDULE, IEEE_EXACT, SGM_SIGMAS, assert_matches_recorded

SD_LINEAR = dict(linear_start=0.00085, linear_end=0.012)


@pytest.fixture(scope="module")
def acp64() -> np.ndarray:
    return schedules.alphas_cumprod_from_betas(schedules.make_beta_schedule("linear", 1000, **SD_LINEAR))


def test_linear_schedule_is_bit_exact_with_the_ldm_buffers(acp64):
    sd = case_state_dict("sd1")
    betas = schedules.make_beta_schedule("linear", 1000, **SD_LINEAR)
    assert betas.dtype == np.float64
    assert_matches_recorded(torch.tensor(betas, dtype=torch.float32), sd["betas"], IEEE_EXACT)
    assert_matches_recorded(torch.tensor(acp64, dtype=torch.float32), sd["alphas_cumprod"], IEEE_EXACT)
    # "linear" in ldm is sqrt-linspace squared, not a plain linspace
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012)
    assert betas[500] != pytest.approx((0.00085 + 0.012) / 2, rel=1e-3)


def test_squaredcos_schedule_matches_the_unclip_noise_augmentor_within_an_ulp():
    sd = case_state_dict("unclip-l")
    betas = schedules.make_beta_schedule("squaredcos_cap_v2", 1000)
    assert_matches_recorded(torch.tensor(betas, dtype=torch.float32), sd["noise_augmentor.betas"], COSINE_SCHEDULE)
    acp = schedules.alphas_cumprod_from_betas(betas)
    assert_matches_recorded(torch.tensor(acp, dtype=torch.float32), sd["noise_augmentor.alphas_cumprod"], COSINE_SCHEDULE)


def test_other_schedules_and_errors():
    cos = schedules.make_beta_schedule("cosine", 1000)
    assert cos.shape == (1000,) and cos.max() <= 0.999 and cos.min() >= 0
    sl = schedules.make_beta_schedule("sqrt_linear", 10, 0.1, 0.2)
    assert np.allclose(sl, np.linspace(0.1, 0.2, 10))
    with pytest.raises(SdgenError):
        schedules.make_beta_schedule("nope", 10)


def test_sigma_range(acp64):
    sigmas = schedules.sigmas_from_alphas_cumprod(acp64)
    assert float(sigmas[0]) == pytest.approx(0.0291672, rel=1e-5)
    assert float(sigmas[-1]) == pytest.approx(14.614641, rel=1e-6)


def test_ddim_timesteps_reproduce_the_compvis_quirks():
    assert schedules.ddim_timesteps(10).tolist() == list(range(1, 1000, 100))
    assert schedules.ddim_timesteps(7).tolist() == [1, 143, 285, 427, 569, 711, 853, 995]  # 8 steps for S=7
    assert len(schedules.ddim_timesteps(30)) == 31
    t50 = schedules.ddim_timesteps(50)
    assert t50[0] == 1 and t50[-1] == 981 and len(t50) == 50
    assert schedules.ddim_timesteps(5, method="quad").tolist()[0] == 1
    for bad in (3, 9, 27, 37, 501):  # stride divides 999: the last timestep would be t = 1000
        with pytest.raises(SdgenError, match="t=1000"):
            schedules.ddim_timesteps(bad)


def test_ddim_grid_equals_golden_timesteps_and_alphas():
    d = case_data("sd1")
    for steps, key in ((10, "ddim10"), (7, "ddim7")):
        t = schedules.ddim_timesteps(steps)
        assert_matches_recorded(torch.as_tensor(t), d[f"{key}.timesteps"], IEEE_EXACT)
    t = schedules.ddim_timesteps(10)
    alphas, alphas_prev = schedules.ddim_alphas(d["alphas_cumprod"], t)
    assert_matches_recorded(alphas, d["ddim10.alphas"], IEEE_EXACT)
    assert_matches_recorded(alphas_prev, d["ddim10.alphas_prev"], IEEE_EXACT)
    assert float(alphas_prev[0]) == pytest.approx(0.99915)  # the last step goes to alphabar[0], not 1
    # the sigma grid is those alphas, reversed, plus the final alpha
    sig = schedules.ddim_sigmas(d["alphas_cumprod"], 10).double()
    expect = torch.cat([alphas.flip(0), alphas_prev[:1]]).double()
    assert torch.allclose(1 / (1 + sig**2), expect, rtol=1e-6, atol=0)
    assert len(schedules.ddim_sigmas(d["alphas_cumprod"], 7)) == 9


def original_sgm_sigmas(indices=None) -> torch.Tensor:
    """generative-models ``LegacyDDPMDiscretization.get_sigmas`` written out (sgm/modules/diffusionmodules/
    discretizer.py with ``make_beta_schedule("linear")``): a torch float64 linspace squared, numpy's cumprod, the
    ratio in float64, a float32 tensor, ``** 0.5`` in float32. Run here, its last bit is this CPU's."""
    betas = (torch.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    if indices is not None:
        alphas_cumprod = alphas_cumprod[np.asarray(indices)]
    return torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32) ** 0.5


@pytest.mark.parametrize("case,legacy", [("sdxl-base", False), ("sdxl-refiner", False), ("sdxl-base-081e0d4", True)])
def test_sgm_discretization_is_bit_exact(case, legacy):
    """Bit for bit against the original's operations on this CPU; within SGM_SIGMAS of the golden buffers."""
    d = case_data(case)
    disc = schedules.LegacyDDPMDiscretization(legacy_range=legacy)
    table = disc(1000, do_append_zero=False, flip=True)
    assert torch.equal(table, original_sgm_sigmas())
    assert_matches_recorded(table, d["denoiser.sigmas_table"], SGM_SIGMAS, "sigma table")
    assert_matches_recorded(table, case_state_dict(case)["denoiser.sigmas"], SGM_SIGMAS, "denoiser.sigmas buffer")
    timesteps = disc.timesteps(10)
    assert_matches_recorded(torch.as_tensor(timesteps[::-1].copy()), d["euler10.timesteps"], IEEE_EXACT)
    grid = "sgm_legacy" if legacy else "sgm"
    for sigmas in (disc(10), grids.grid_sigmas(grid, disc.alphas_cumprod, 10)):
        assert torch.equal(sigmas, torch.cat([original_sgm_sigmas(timesteps).flip(0), torch.zeros(1)]))
        assert_matches_recorded(sigmas, d["euler10.sigmas"], SGM_SIGMAS, "10-step grid")


def test_sgm_discretization_spacings(acp64):
    disc = schedules.LegacyDDPMDiscretization()
    t = disc.timesteps(50)
    assert t[0] == 19 and t[-1] == 999 and np.all(np.diff(t) == 20)
    s = disc(50)
    assert len(s) == 51 and s[-1] == 0
    assert float(s[0]) == pytest.approx(14.6146, abs=1e-4) and float(s[-2]) == pytest.approx(0.13445, abs=1e-5)
    legacy = schedules.LegacyDDPMDiscretization(legacy_range=True)
    assert legacy.timesteps(50)[-1] == 981
    assert float(legacy(50)[0]) == pytest.approx(13.1204, abs=1e-4)
    assert len(disc(1000)) == 1001
    with pytest.raises(SdgenError):
        disc(1001)


def _suggested_counts(message: str) -> list[int]:
    """The step counts an error message proposes ("... use e.g. 35 or 38 steps")."""
    return [int(n) for n in message.split("use e.g.")[1].split("steps")[0].split(" or ")]


@pytest.mark.parametrize("steps", [3, 9, 37, 111, 600, 999])
def test_sgm_legacy_grid_refuses_counts_that_reach_t_1000(acp64, steps):
    """range(0, 1000, 1000 // S) + 1 ends at t = 1000 when the stride divides 999: a one-line SdgenError
    naming usable counts (not an IndexError), from every entry point that builds the 0.9-release grid."""
    builders = (
        lambda n: schedules.sgm_timesteps(n, 1000, legacy_range=True),
        lambda n: schedules.sgm_grid(acp64, n, legacy_range=True),
        lambda n: schedules.LegacyDDPMDiscretization(legacy_range=True)(n),
        lambda n: grids.grid_sigmas("sgm_legacy", acp64, n),
    )
    for build in builders:
        with pytest.raises(SdgenError, match=f"{steps} steps on the sgm_legacy grid .* t=1000") as info:
            build(steps)
    suggested = _suggested_counts(str(info.value))
    assert len(suggested) == 2
    for n in suggested:
        t = schedules.sgm_timesteps(n, 1000, legacy_range=True)
        assert t[-1] <= 999 and len(grids.grid_sigmas("sgm_legacy", acp64, n)) == len(t) + 1
    # the current SGM spacing ends at 999 for any count
    assert schedules.sgm_timesteps(steps, 1000)[-1] == 999


def test_sgm_legacy_grid_keeps_its_valid_counts(acp64):
    legacy = schedules.LegacyDDPMDiscretization(legacy_range=True)
    assert legacy.timesteps(7).tolist() == [1, 143, 285, 427, 569, 711, 853, 995]  # 8 entries, as CompVis
    assert legacy.timesteps(500)[-1] == 999
    assert torch.equal(legacy(1000), schedules.LegacyDDPMDiscretization()(1000))  # the full table (both made here)
    assert schedules.sgm_timesteps(1000, 1000, legacy_range=True).tolist() == list(range(1000))


@pytest.mark.parametrize("grid", list(grids.GRIDS))
@pytest.mark.parametrize("steps", [0, -1])
def test_every_grid_refuses_fewer_than_one_step(acp64, grid, steps):
    with pytest.raises(SdgenError, match=f"got {steps}"):
        grids.grid_sigmas(grid, acp64, steps)


def test_timestep_grids_refuse_more_steps_than_the_table(acp64):
    """The integer grids pick DDPM timesteps: at most N of them. The continuous ones may take more."""
    for grid in ("ddim", "sgm", "sgm_legacy"):
        with pytest.raises(SdgenError, match="1001"):
            grids.grid_sigmas(grid, acp64, 1001)
    for legacy in (False, True):
        with pytest.raises(SdgenError, match="1001"):
            schedules.sgm_timesteps(1001, 1000, legacy_range=legacy)
        with pytest.raises(SdgenError, match="got 0"):
            schedules.sgm_timesteps(0, 1000, legacy_range=legacy)
    for grid in ("dpm_solver", "karras", "linspace_t"):
        assert len(grids.grid_sigmas(grid, acp64, 1200)) == 1201


def test_karras_and_linspace_t(acp64):
    k = schedules.karras_sigmas(10, 0.03, 14.6, rho=7.0)
    assert k.dtype == torch.float32 and len(k) == 11 and k[-1] == 0
    assert float(k[0]) == pytest.approx(14.6, rel=1e-6) and float(k[-2]) == pytest.approx(0.03, rel=1e-6)
    ramp = 4 / 9
    mid = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert float(k[4]) == pytest.approx(mid, rel=1e-6)
    lt = schedules.linspace_t_sigmas(acp64, 10).double()
    table = schedules.sigmas_from_alphas_cumprod(acp64)
    assert float(lt[0]) == pytest.approx(float(table[-1]), rel=1e-6)
    assert float(lt[-2]) == pytest.approx(float(table[0]), rel=1e-6)
    # t = 999 * 8/9 = 888: exactly on the table
    assert float(lt[1]) == pytest.approx(float(table[888]), rel=1e-6)
    # fractional t interpolates log sigma: t = 999 * 7/9 = 777
    assert float(lt[2]) == pytest.approx(float(table[777]), rel=1e-6)


def test_dpm_solver_time_grid_roundtrip(acp64):
    sig = schedules.dpm_solver_sigmas(acp64, 10)
    assert len(sig) == 11 and torch.all(sig[:-1] > sig[1:])
    table = schedules.sigmas_from_alphas_cumprod(acp64)
    assert float(sig[0]) == pytest.approx(float(table[-1]), rel=1e-6)
    assert float(sig[-1]) == pytest.approx(float(table[0]), rel=1e-6)
    t_model = (schedules.sigma_to_vp_time(sig.double(), acp64) - 1e-3) * 1000
    expect = (torch.linspace(1.0, 1e-3, 11, dtype=torch.float64) - 1e-3) * 1000
    assert torch.allclose(t_model, expect, atol=2e-3)
    # on the integer points the continuous time is the discrete index
    t = schedules.sigma_to_vp_time(table[[0, 250, 999]], acp64)
    assert torch.allclose((t - 1e-3) * 1000, torch.tensor([0.0, 250.0, 999.0], dtype=torch.float64), atol=1e-8)
    # log alpha is linear in t between the integer points (CV dpm_solver.py NoiseScheduleVP 'discrete')
    s_mid = schedules.vp_time_to_sigma(torch.tensor([0.5005], dtype=torch.float64), acp64)
    la = -0.5 * math.log1p(float(s_mid) ** 2)
    assert la == pytest.approx(0.25 * (math.log(acp64[499]) + math.log(acp64[500])), rel=1e-10)
    lsnr = schedules.dpm_solver_sigmas(acp64, 5, skip_type="logSNR").double().log()
    assert torch.allclose(lsnr[1:] - lsnr[:-1], (lsnr[1] - lsnr[0]).expand(5), rtol=1e-5)


def test_compvis_img2img_truncation_off_by_one():
    d = case_data("sd1")
    acp = d["alphas_cumprod"]
    sig = schedules.ddim_sigmas(acp, 10)
    s_noise, run = schedules.compvis_img2img_sigmas(sig, 0.5, 10)
    table = schedules.sigmas_from_alphas_cumprod(acp).to(torch.float32)
    assert int(d["img2img.t_enc"]) == 5
    assert s_noise == table[501]  # noised at DDIM index t_enc = 5 -> t 501 ...
    assert torch.equal(run, table[[401, 301, 201, 101, 1, 0]])  # ... but denoised from index 4 -> t 401
    z_enc = schedules.compvis_stochastic_encode(d["img2img.z0"], d["img2img.noise"], s_noise)
    assert torch.allclose(z_enc, d["img2img.z_enc"], rtol=1e-6, atol=1e-6)
    # S=7 has 8 DDIM steps; t_enc uses the requested 7
    s7 = schedules.ddim_sigmas(acp, 7)
    s_noise7, run7 = schedules.compvis_img2img_sigmas(s7, 1.0, 7)
    assert s_noise7 == table[995] and len(run7) == 8
    with pytest.raises(SdgenError):
        schedules.compvis_img2img_sigmas(sig, 1.0, 10)  # t_enc = 10: the original indexes past its table
    _, run0 = schedules.compvis_img2img_sigmas(sig, 0.05, 10)
    assert len(run0) == 1  # t_enc = 0: nothing to sample


def test_sgm_img2img_pruning():
    disc = schedules.LegacyDDPMDiscretization()
    table = disc(1000, do_append_zero=False, flip=True)
    refiner = schedules.sgm_img2img_sigmas(disc(50), 0.15)  # the SGM refiner's img2img at strength 0.15
    assert torch.equal(refiner, torch.cat([table[[119, 99, 79, 59, 39, 19]], torch.zeros(1)]))
    # 0.9 release refiner: plain img2img at strength 0.3 on the legacy grid: 14 steps from t = 261
    legacy = schedules.LegacyDDPMDiscretization(legacy_range=True)
    r09 = schedules.sgm_img2img_sigmas(legacy(50), 0.3)
    assert len(r09) == 15 and float(r09[0]) == float(table[261])
    assert float(r09[0]) == pytest.approx(0.7247, abs=1e-4)
    assert torch.equal(grids.sdedit_sigmas(legacy(50), 0.3), r09)
    with pytest.raises(SdgenError, match="leaves no denoising step"):
        grids.sdedit_sigmas(disc(10), 0.1)
    z = torch.randn(1, 4, 2, 2)
    noise = torch.randn(1, 4, 2, 2)
    x = schedules.sgm_img2img_start(z, noise, r09[0])
    assert torch.allclose(x, z + noise * r09[0])
    assert torch.equal(schedules.sgm_img2img_start(z, None, r09[0]), z)


def test_vp_ve_conversions():
    x = torch.randn(2, 3)
    s = torch.tensor(14.6146)
    assert torch.allclose(schedules.vp_to_ve(x, s), x * math.sqrt(1 + 14.6146**2), rtol=1e-6)
    assert torch.allclose(schedules.ve_to_vp(schedules.vp_to_ve(x, s), s), x, rtol=1e-6)
    assert torch.equal(schedules.ve_to_vp(x, 0.0), x)
