"""Samplers on an analytic denoiser, and DDIM / PLMS / DPM-Solver against the original update equations.

Data x0 ~ N(MU, S^2) per dimension has the exact denoiser D(x, sigma) = (S^2 x + sigma^2 MU) / (S^2 + sigma^2)
and the exact probability-flow map x(sigma_end) - MU = sqrt((S^2 + sigma_end^2) / (S^2 + sigma_0^2)) (x(sigma_0) - MU).
Deterministic samplers start from quantile-spaced points of N(MU, S^2 + sigma_0^2) (so the only error left is
the discretisation); stochastic samplers from the same points with seeded noise. Tensors stay below 32768
elements (torch then runs element-wise ops on one thread). Tolerances reached (measured when written):

    deterministic (variance rel. error / max path error):
      ddim     ddim grid 500 steps   6.6e-3 / 1.1e-2      euler  sgm grid 999 steps  5.8e-3 / 9.5e-3
      euler    karras 1000 steps     4.5e-3 / 7.2e-3      plms   ddim grid 100 steps 1.0e-4 / 1.7e-4
      dpmpp_2m karras 50 steps       2.4e-3 / 3.8e-3      heun   karras 50 steps     2.3e-3 / 3.8e-3
    stochastic, 64000 samples, 500 steps (Heun 200): |mean error| <= 0.0025 (bound: 4 standard errors, 0.013);
    variance within 0.03 % of the exact discrete-chain variance (bound 4 s.e., 2.2 %) and within 1.8 % of
    S^2 + sigma_end^2 (bound 4 %; the remainder is the O(1/n) bias of the ancestral / churned chains).
    eps / v networks through Denoiser (all time modes): x0 within 1e-12 of the exact denoiser.
    CompVis DDIM (eta 0 and 1), PLMS, SAI2 v-DDIM, CompVis DPM-Solver++(2M): VP results within 1e-11.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.errors import SdgenError
from ldm.sampling import grids
from ldm.sampling import samplers as smp
from ldm.sampling import schedules
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.noise import BatchedNoiseSampler, image_seeds, initial_noise, make_generators
from tests.golden import sample

MU, S = 0.3, 0.8
ACP = torch.tensor(schedules.alphas_cumprod_from_betas(schedules.make_beta_schedule("linear", 1000, 0.00085, 0.012)))
TABLE = schedules.sigmas_from_alphas_cumprod(ACP)
N_T = len(ACP)


def exact_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None, **_) -> torch.Tensor:
    s = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (S**2 * x + s**2 * MU) / (S**2 + s**2)


def quantile_points(n: int, rows: int = 4) -> torch.Tensor:
    """n standard-normal quantiles, shaped (rows, n // rows): exact mean 0, variance ~1."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.special.ndtri(q).reshape(rows, n // rows)


def start(z: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    return MU + math.sqrt(S**2 + float(sigmas[0]) ** 2) * z


def exact_flow(x_start: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    ratio = (S**2 + float(sigmas[-1]) ** 2) / (S**2 + float(sigmas[0]) ** 2)
    return MU + math.sqrt(ratio) * (x_start - MU)


# ---------------------------------------------------------------------------------------------------------------
# networks built from the analytic x0, with the time -> sigma maps written out independently
# ---------------------------------------------------------------------------------------------------------------


def t_to_sigma(t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode in ("integer", "nearest"):
        assert t.dtype == torch.int64
        return TABLE[t]
    assert t.dtype == torch.float64
    if mode == "interpolate":  # k-diffusion t_to_sigma: log sigma linear between integer t
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return ((1 - w) * TABLE.log()[lo] + w * TABLE.log()[hi]).exp()
    # continuous (CompVis DPM-Solver): t_model = (t_cont - 1/N) * 1000, log alpha linear in t_cont
    t_cont = t.numpy() / 1000.0 + 1.0 / N_T
    la = np.interp(t_cont, np.arange(1, N_T + 1) / N_T, 0.5 * np.log(ACP.numpy()))
    return torch.from_numpy(np.sqrt(np.expm1(-2 * la)))


def analytic_net(parameterization: str, mode: str):
    """net(x_in, t, cond) -> eps or v of the Gaussian data, with x_in the VP input x / sqrt(1 + sigma^2)."""

    def net(x_in: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        sigma = t_to_sigma(t, mode).reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in * torch.sqrt(1 + sigma**2)
        x0 = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
        eps = (x - x0) / sigma
        if parameterization == "eps":
            return eps
        a = 1 / (1 + sigma**2)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return net


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("mode", ["integer", "nearest", "interpolate", "continuous"])
def test_denoiser_returns_the_exact_x0(parameterization, mode):
    den = Denoiser(analytic_net(parameterization, mode), ACP, parameterization, mode)
    x = quantile_points(64, rows=4) * 3 + MU
    if mode == "integer":
        sigma = TABLE[[999, 500, 17, 0]]
    else:
        sigma = torch.tensor([14.0, 3.3, 0.2, 0.031], dtype=torch.float64)
    used = TABLE[den.sigma_to_index(sigma)] if mode == "nearest" else sigma
    out = den(x, sigma, None)
    assert torch.allclose(out, exact_denoiser(x, used), rtol=0, atol=1e-12)
    if mode == "nearest":  # SGM quantizes sigma itself, not only the network time
        assert not torch.allclose(used, sigma)


def test_integer_mode_refuses_sigmas_off_the_table():
    den = Denoiser(analytic_net("eps", "integer"), ACP, "eps", "integer")
    with pytest.raises(SdgenError):
        den(torch.zeros(1, 2), torch.tensor([3.3], dtype=torch.float64), None)


def test_interpolate_mode_time_matches_k_diffusion():
    den = Denoiser(analytic_net("eps", "interpolate"), ACP, "eps", "interpolate")
    t = torch.tensor([0.0, 0.25, 411.5, 998.75, 999.0], dtype=torch.float64)
    assert torch.allclose(den.sigma_to_t(t_to_sigma(t, "interpolate")), t, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------------------------

DETERMINISTIC = [
    # sampler, grid, steps, variance tolerance, path tolerance
    ("ddim", None, 500, 1.2e-2, 2e-2),
    ("euler", None, 999, 1.2e-2, 2e-2),
    ("euler", "karras", 1000, 1e-2, 1.5e-2),
    ("plms", None, 100, 3e-4, 4e-4),
    ("dpmpp_2m", "karras", 50, 5e-3, 8e-3),
    ("heun", "karras", 50, 5e-3, 8e-3),
]


@pytest.mark.parametrize("name,grid,steps,var_tol,path_tol", DETERMINISTIC)
def test_deterministic_samplers_reach_the_data_distribution(name, grid, steps, var_tol, path_tol):
    sigmas = grids.sampler_sigmas(name, ACP, steps, grid=grid).double()
    z = quantile_points(20000)
    x0 = start(z, sigmas)
    out = smp.SAMPLERS[name](exact_denoiser, x0, sigmas)
    target_var = (S**2 + float(sigmas[-1]) ** 2) * float(z.var())
    assert abs(float(out.mean()) - MU) < 1e-9  # the maps are affine: the mean is exact
    assert abs(float(out.var()) / target_var - 1) < var_tol
    assert float((out - exact_flow(x0, sigmas)).abs().max()) < path_tol


def test_second_order_samplers_beat_first_order_ones():
    sig = grids.sampler_sigmas("euler", ACP, 25, grid="karras").double()
    x0 = start(quantile_points(400), sig)
    errors = {
        name: float((smp.SAMPLERS[name](exact_denoiser, x0, sig) - exact_flow(x0, sig)).abs().max())
        for name in ("euler", "ddim", "heun", "dpmpp_2m", "plms")
    }
    assert errors["euler"] == pytest.approx(errors["ddim"], rel=1e-9)  # DDIM with eta 0 is Euler in sigma
    for second in ("heun", "dpmpp_2m", "plms"):
        assert errors[second] < errors["euler"] / 4


def chain_variance(sigmas: torch.Tensor, kind: str, s_churn: float = 0.0) -> float:
    """Exact variance after the discrete chain on the Gaussian data (ancestral or churned Euler steps)."""
    n = len(sigmas) - 1
    var = S**2 + float(sigmas[0]) ** 2
    for i in range(n):
        a, b = float(sigmas[i]), float(sigmas[i + 1])
        if kind == "ancestral":
            up = min(b, math.sqrt(b**2 * (a**2 - b**2) / a**2))
            down = math.sqrt(b**2 - up**2)
            var = var * (1 + a * (down - a) / (S**2 + a**2)) ** 2 + (up**2 if b > 0 else 0.0)
        else:
            hat = a * (1 + min(s_churn / n, 2**0.5 - 1))
            var = (var + hat**2 - a**2) * (1 + hat * (b - hat) / (S**2 + hat**2)) ** 2
    return var


STOCHASTIC = [
    ("euler_ancestral", "karras", {}, "ancestral"),
    ("ddim", None, {"eta": 1.0}, "ancestral"),
    ("euler", "karras", {"s_churn": 10.0}, "churn"),
    ("heun", "karras", {"s_churn": 10.0}, None),
]


@pytest.mark.parametrize("name,grid,options,kind", STOCHASTIC)
def test_stochastic_samplers_reach_the_data_distribution(name, grid, options, kind):
    steps = 500 if name != "heun" else 200
    sigmas = grids.sampler_sigmas(name, ACP, steps, grid=grid).double()
    z = quantile_points(32000)
    outs = []
    for seed in (0, 100):
        noise = BatchedNoiseSampler(image_seeds(seed, 4), z.shape[1:], dtype=torch.float64)
        outs.append(smp.SAMPLERS[name](exact_denoiser, start(z, sigmas), sigmas, noise_sampler=noise, **options))
    out = torch.cat(outs)
    target = S**2 + float(sigmas[-1]) ** 2
    n = out.numel()
    assert abs(float(out.mean()) - MU) < 4 * math.sqrt(target / n)
    assert abs(float(out.var()) / target - 1) < 0.04
    if kind is not None:
        chain = chain_variance(sigmas, kind, options.get("s_churn", 0.0))
        assert abs(float(out.var()) / chain - 1) < 4 * math.sqrt(2 / n)


def test_ddim_eta_is_euler_ancestral():
    sigmas = grids.sampler_sigmas("ddim", ACP, 20).double()
    x0 = start(quantile_points(400), sigmas)
    runs = []
    for name, opts in (("ddim", {"eta": 0.7}), ("euler_ancestral", {"eta": 0.7})):
        noise = BatchedNoiseSampler([1, 2, 3, 4], (100,), dtype=torch.float64)
        runs.append(smp.SAMPLERS[name](exact_denoiser, x0, sigmas, noise_sampler=noise, **opts))
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("name", list(smp.SAMPLERS))
def test_samplers_through_the_denoiser_class(parameterization, name):
    """eps / v networks with each sampler's default grid and time mode give the exact-denoiser trajectory."""
    steps = 50
    sigmas = grids.sampler_sigmas(name, ACP, steps, dtype=torch.float64)
    mode = grids.default_time_mode(name)
    den = Denoiser(analytic_net(parameterization, mode), ACP, parameterization, mode)

    def reference(x, sigma, cond=None):
        if mode in ("integer", "nearest"):  # the network sees (and the scalings use) the nearest table sigma
            sigma = TABLE[(sigma[None, :] - TABLE[:, None]).abs().argmin(0)]
        return exact_denoiser(x, sigma)

    z = quantile_points(2000)
    opts = {"eta": 1.0} if name == "euler_ancestral" else {}
    runs = []
    for d in (den, reference):
        noise = BatchedNoiseSampler([1, 2, 3, 4], z.shape[1:], dtype=torch.float64)
        runs.append(smp.SAMPLERS[name](d, start(z, sigmas), sigmas, noise_sampler=noise, **opts))
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-10)
    if name not in ("euler_ancestral", "dpmpp_2m"):  # dpmpp_2m's CompVis time-uniform grid is coarse at the end
        assert abs(float(runs[0].var()) / (S**2 + float(sigmas[-1]) ** 2) - 1) < 0.1


# ---------------------------------------------------------------------------------------------------------------
# the original update equations, written out (VP space, integer / continuous t)
# ---------------------------------------------------------------------------------------------------------------


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear eps network of (x_t, t), t integer or float."""
    return 0.5 * torch.tanh(x) + 0.05 * x * torch.cos(t.to(torch.float64) / 150).reshape(-1, *([1] * (x.ndim - 1)))


def model_denoiser(parameterization: str, mode: str) -> Denoiser:
    return Denoiser(lambda x, t, cond: eps_model(x, t), ACP, parameterization, mode)


def compvis_ddim(x: torch.Tensor, steps: int, eta: float = 0.0, noises=None, v: bool = False) -> torch.Tensor:
    """CV ddim.py p_sample_ddim (and SAI2's v branch), eta sigma_t from make_ddim_sampling_parameters."""
    t = schedules.ddim_timesteps(steps)
    a_all, a_prev_all = schedules.ddim_alphas(ACP, t)
    for i, idx in enumerate(reversed(range(len(t)))):
        a, a_prev = a_all[idx], a_prev_all[idx]
        sigma_t = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        out = eps_model(x, torch.full((x.shape[0],), int(t[idx])))
        if v:
            e_t = a.sqrt() * out + (1 - a).sqrt() * x
            pred_x0 = a.sqrt() * x - (1 - a).sqrt() * out
        else:
            e_t = out
            pred_x0 = (x - (1 - a).sqrt() * e_t) / a.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if eta > 0:
            x = x + sigma_t * noises[i]
    return x


def compvis_plms(x: torch.Tensor, steps: int) -> torch.Tensor:
    """CV plms.py p_sample_plms: pseudo improved Euler first, then Adams-Bashforth on the raw eps history."""
    t = schedules.ddim_timesteps(steps)
    a_all, a_prev_all = schedules.ddim_alphas(ACP, t)
    time_range = list(reversed(t.tolist()))

    def x_prev_of(x, e, idx):
        a, a_prev = a_all[idx], a_prev_all[idx]
        pred_x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e

    old_eps: list[torch.Tensor] = []
    for i, step in enumerate(time_range):
        idx = len(t) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = eps_model(x, torch.full((x.shape[0],), step))
        if not old_eps:
            x_prev = x_prev_of(x, e_t, idx)
            e_prime = (e_t + eps_model(x_prev, torch.full((x.shape[0],), t_next))) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_prime, idx)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


def compvis_dpm_solver(x: torch.Tensor, steps: int) -> torch.Tensor:
    """CV dpm_solver.py: DPM-Solver++ multistep order 2, time_uniform, lower_order_final, discrete VP schedule."""
    t_array = np.arange(1, N_T + 1) / N_T
    la_array = 0.5 * np.log(ACP.numpy())

    def coeffs(t: float):
        la = float(np.interp(t, t_array, la_array))
        alpha, sigma = math.exp(la), math.sqrt(1 - math.exp(2 * la))
        return alpha, sigma, la - math.log(sigma)

    def x0_of(x, t):
        alpha, sigma, _ = coeffs(t)
        e = eps_model(x, torch.full((x.shape[0],), (t - 1.0 / N_T) * 1000.0, dtype=torch.float64))
        return (x - sigma * e) / alpha

    ts = np.linspace(1.0, 1.0 / N_T, steps + 1)
    models, times = [x0_of(x, ts[0])], [ts[0]]
    for step in range(1, steps + 1):
        t = ts[step]
        alpha_t, sigma_t, lam_t = coeffs(t)
        _, sigma_s, lam_s = coeffs(times[-1])
        h = lam_t - lam_s
        order = 1 if step == 1 or (steps < 15 and step == steps) else 2
        if order == 1:
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * models[-1]
        else:
            r0 = (lam_s - coeffs(times[-2])[2]) / h
            d1 = (1.0 / r0) * (models[-1] - models[-2])
            phi = alpha_t * (math.exp(-h) - 1)
            x = (sigma_t / sigma_s) * x - phi * models[-1] - 0.5 * phi * d1
        times.append(t)
        if step < steps:
            models.append(x0_of(x, t))
    return x


def noisy_start(steps: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("steps", [10, 7])
def test_ddim_matches_the_compvis_equations(steps):
    x_t = noisy_start(steps)
    sigmas = grids.sampler_sigmas("ddim", ACP, steps, dtype=torch.float64)
    ours = sample("ddim", model_denoiser("eps", "integer"), x_t, sigmas)
    assert torch.allclose(ours, compvis_ddim(x_t, steps), rtol=0, atol=1e-11)


def test_ddim_v_matches_the_sai2_equations():
    x_t = noisy_start(10)
    sigmas = grids.sampler_sigmas("ddim", ACP, 10, dtype=torch.float64)
    ours = sample("ddim", model_denoiser("v", "integer"), x_t, sigmas)
    assert torch.allclose(ours, compvis_ddim(x_t, 10, v=True), rtol=0, atol=1e-11)


def test_stochastic_ddim_matches_the_compvis_equations():
    x_t = noisy_start(10)
    sigmas = grids.sampler_sigmas("ddim", ACP, 10, dtype=torch.float64)
    draws = initial_noise((3, 4, 4), [7] * 10, dtype=torch.float64)  # one (3,4,4) draw per step
    per_step = [draws[i].expand(2, 3, 4, 4) for i in range(10)]
    calls = iter(range(10))

    def noise_sampler(sigma, sigma_next):
        i = next(calls)
        # CompVis adds sigma_t * z in VP space; in VE space that is z * sigma_t / sqrt(a_prev) = z * sigma_up
        return per_step[i]

    ours = sample("ddim", model_denoiser("eps", "integer"), x_t, sigmas, noise_sampler=noise_sampler, eta=1.0)
    assert torch.allclose(ours, compvis_ddim(x_t, 10, eta=1.0, noises=per_step), rtol=0, atol=1e-11)


@pytest.mark.parametrize("steps", [10, 4])
def test_plms_matches_the_compvis_equations(steps):
    x_t = noisy_start(steps)
    calls = []
    den = model_denoiser("eps", "integer")

    def counting(x, sigma, cond=None):
        calls.append(float(sigma[0]))
        return den(x, sigma, cond)

    sigmas = grids.sampler_sigmas("plms", ACP, steps, dtype=torch.float64)
    ours = sample("plms", counting, x_t, sigmas)
    assert torch.allclose(ours, compvis_plms(x_t, steps), rtol=0, atol=1e-11)
    assert len(calls) == steps + 1  # the first step evaluates twice


def test_dpmpp_2m_matches_compvis_dpm_solver():
    x_t = noisy_start(10)
    sigmas = grids.sampler_sigmas("dpmpp_2m", ACP, 10, dtype=torch.float64)
    ours = sample("dpmpp_2m", model_denoiser("eps", "continuous"), x_t, sigmas)
    assert torch.allclose(ours, compvis_dpm_solver(x_t, 10), rtol=0, atol=1e-11)
    without = sample("dpmpp_2m", model_denoiser("eps", "continuous"), x_t, sigmas, lower_order_final=False)
    assert not torch.allclose(without, compvis_dpm_solver(x_t, 10), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# guidance, callbacks, noise, errors
# ---------------------------------------------------------------------------------------------------------------


def test_cfg_is_one_batched_call_uncond_first():
    seen = []

    def den(x, sigma, cond, **_):
        seen.append((x.shape[0], cond["crossattn"][:, 0, 0].tolist(), cond["mode"]))
        return x * cond["crossattn"][:, 0, 0].reshape(-1, 1, 1, 1)

    x = torch.ones(2, 1, 2, 2)
    cond = {"cond": {"crossattn": torch.full((2, 3, 1), 2.0), "mode": "a"},
            "uncond": {"crossattn": torch.full((2, 3, 1), 0.5), "mode": "a"}}
    out = CFGDenoiser(den, 7.5)(x, torch.ones(2), cond)
    assert seen == [(4, [0.5, 0.5, 2.0, 2.0], "a")]
    assert torch.allclose(out, torch.full_like(x, 0.5 + 7.5 * (2.0 - 0.5)))
    seen.clear()
    out1 = CFGDenoiser(den, 1.0)(x, torch.ones(2), cond)
    assert seen == [(2, [2.0, 2.0], "a")] and torch.allclose(out1, 2 * x)
    with pytest.raises(ValueError):
        CFGDenoiser(den, 3.0)(x, torch.ones(2), {"cond": {"crossattn": cond["cond"]["crossattn"]}, "uncond": {}})


@pytest.mark.parametrize("name", list(smp.SAMPLERS))
def test_callback_once_per_step_after_all_evaluations(name):
    events = []

    def den(x, sigma, cond=None):
        events.append("D")
        return exact_denoiser(x, sigma)

    sigmas = grids.sampler_sigmas(name, ACP, 6).double()
    noise = BatchedNoiseSampler([0], (3,), dtype=torch.float64)
    smp.SAMPLERS[name](den, torch.ones(1, 3, dtype=torch.float64), sigmas, noise_sampler=noise,
                       callback=lambda info: events.append(info["i"]))
    steps = [e for e in events if e != "D"]
    assert steps == list(range(len(sigmas) - 1))
    assert events[-1] == len(sigmas) - 2 and events[0] == "D"


def test_per_image_noise_is_batch_independent():
    batch = initial_noise((4, 8, 8), [10, 11, 12])
    alone = initial_noise((4, 8, 8), [11])
    assert torch.equal(batch[1], alone[0])
    assert torch.equal(batch[0], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(10)))
    gens = make_generators([10, 11])
    first = initial_noise((4, 8, 8), [10, 11], generators=gens)
    shared = BatchedNoiseSampler([10, 11], (4, 8, 8), generators=gens)(None, None)
    fresh = BatchedNoiseSampler([11], (4, 8, 8))(None, None)
    assert torch.equal(first, batch[:2])
    assert torch.equal(shared[1], fresh[0])  # skip_initial continues the stream like a shared generator
    assert not torch.allclose(shared, first)  # ancestral noise does not repeat the initial latent
    assert image_seeds(42, 3) == [42, 43, 44]


def test_initial_and_final_latent_conversions():
    noise = torch.randn(1, 4, 2, 2)
    sig = grids.sampler_sigmas("euler", ACP, 10)
    assert torch.allclose(grids.initial_x(noise, sig), noise * torch.sqrt(1 + sig[0] ** 2))
    ddim = grids.sampler_sigmas("ddim", ACP, 10)
    assert torch.allclose(grids.final_latent(noise, ddim), noise / math.sqrt(1 + float(ddim[-1]) ** 2))
    assert torch.equal(grids.final_latent(noise, sig), noise)


def test_sampler_errors():
    sig = grids.sampler_sigmas("ddim", ACP, 5).double()
    x = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(SdgenError):
        smp.sample_ddim(exact_denoiser, x, sig, eta=0.5)  # needs a noise sampler
    with pytest.raises(SdgenError):
        smp.sample_plms(exact_denoiser, x, sig, eta=0.5)
    with pytest.raises(SdgenError):
        grids.sampler_sigmas("nope", ACP, 5)
    with pytest.raises(SdgenError):
        grids.sampler_sigmas("ddim", ACP, 501)
