"""Safe Latent Diffusion: the guidance update against the paper's equations, the guider, the presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.errors import SdgenError
from ldm.sampling.sld import SLDGuider, sld_combine, sld_enabled
from ldm.sld_config import (
    DEFAULT_SAFETY_CONCEPT,
    PRESET_NAMES,
    SLDParams,
    load_preset,
    load_sld_config,
    resolve_sld_params,
)


def reference_sld(eps_u, eps_p, eps_s, steps, s_g, s_s, warmup, lam, s_m, beta):
    """SLD written out per element in plain Python, step by step (paper eqs. 3-8, reference pipeline).

    eps_* are lists over steps of lists of floats. Returns the guided eps per step.
    """
    n = len(eps_u[0])
    nu = [0.0] * n
    out = []
    for i in range(steps):
        guided = []
        for k in range(n):
            u, p, s = eps_u[i][k], eps_p[i][k], eps_s[i][k]
            # eq. 6: mu = min(1, s_S |eps_p - eps_S|) where eps_p - eps_S < lambda, else 0
            mu = min(1.0, s_s * abs(p - s)) if (p - s) < lam else 0.0
            # eqs. 4 and 7: gamma = mu (eps_S - eps_u) + s_m nu
            gamma = mu * (s - u) + s_m * nu[k]
            # eq. 8: momentum update, every step
            nu[k] = beta * nu[k] + (1 - beta) * gamma
            # eq. 3 after warm-up, plain CFG before
            if i >= warmup:
                guided.append(u + s_g * (p - u - gamma))
            else:
                guided.append(u + s_g * (p - u))
        out.append(guided)
    return out


def make_predictions(steps: int, n: int, seed: int = 0):
    """Hand-made eps predictions: the safety prediction sits close to the prompt's in some elements."""
    g = torch.Generator().manual_seed(seed)
    eps_u = torch.randn(steps, n, generator=g, dtype=torch.float64)
    eps_p = eps_u + 0.05 * torch.randn(steps, n, generator=g, dtype=torch.float64)
    # differences eps_p - eps_S spread around the thresholds: some negative, some tiny, some large
    offsets = torch.linspace(-0.02, 0.03, n, dtype=torch.float64)
    eps_s = eps_p - offsets - 0.0005 * torch.randn(steps, n, generator=g, dtype=torch.float64)
    return eps_u, eps_p, eps_s


@pytest.mark.parametrize(
    "params",
    [
        SLDParams(guidance_scale=1000.0, warmup_steps=2, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
        SLDParams(guidance_scale=2000.0, warmup_steps=0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
        SLDParams(guidance_scale=20.0, warmup_steps=3, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    ],
)
def test_sld_combine_matches_equations(params: SLDParams) -> None:
    steps, n, s_g = 5, 24, 7.5
    eps_u, eps_p, eps_s = make_predictions(steps, n)
    expected = reference_sld(
        eps_u.tolist(), eps_p.tolist(), eps_s.tolist(), steps, s_g, params.guidance_scale,
        params.warmup_steps, params.threshold, params.momentum_scale, params.momentum_beta,
    )
    momentum = torch.zeros(n, dtype=torch.float64)
    for i in range(steps):
        eps, momentum = sld_combine(eps_u[i], eps_p[i], eps_s[i], momentum, i, s_g, params)
        torch.testing.assert_close(eps, torch.tensor(expected[i], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_sld_combine_pieces() -> None:
    """Threshold mask, clamp, warm-up and momentum on single hand-computed elements."""
    params = SLDParams(guidance_scale=100.0, warmup_steps=1, threshold=0.01, momentum_scale=0.5, momentum_beta=0.5)
    eps_u = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    eps_p = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    # eps_p - eps_S: 0.02 (>= lambda: masked), 0.005 (scale 0.5), -0.5 (scale clamped to 1)
    eps_s = torch.tensor([0.98, 0.995, 1.5], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    # step 0 is warm-up: output is plain CFG, momentum picks up (1 - beta) * gamma
    eps, nu = sld_combine(eps_u, eps_p, eps_s, zero, 0, 2.0, params)
    torch.testing.assert_close(eps, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    gamma0 = torch.tensor([0.0, 0.5 * 0.995, 1.5], dtype=torch.float64)
    torch.testing.assert_close(nu, 0.5 * gamma0)
    # step 1: gamma = mu (eps_S - eps_u) + s_m nu, applied
    eps, nu2 = sld_combine(eps_u, eps_p, eps_s, nu, 1, 2.0, params)
    gamma1 = gamma0 + 0.5 * nu
    torch.testing.assert_close(eps, 2.0 * (eps_p - eps_u - gamma1))
    torch.testing.assert_close(nu2, 0.5 * nu + 0.5 * gamma1)
    # the masked element still gets the momentum term (momentum comes from other steps only: here 0)
    assert eps[0].item() == pytest.approx(2.0)


def test_sld_scale_zero_is_plain_cfg_exactly() -> None:
    eps_u, eps_p, eps_s = make_predictions(4, 50, seed=3)
    params = SLDParams(guidance_scale=0.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7)
    momentum = torch.zeros(50, dtype=torch.float64)
    for i in range(4):
        eps, momentum = sld_combine(eps_u[i], eps_p[i], eps_s[i], momentum, i, 7.5, params)
        assert torch.equal(eps, eps_u[i] + 7.5 * (eps_p[i] - eps_u[i]))
        assert torch.equal(momentum, torch.zeros_like(momentum))


class TableDenoiser:
    """D(x, sigma, cond) = x - sigma * cond["crossattn"]: the cond carries the eps each branch predicts."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x - sigma.reshape(-1, 1, 1, 1) * cond["crossattn"]


def plain_cfg(denoiser, scale):
    def guide(x, sigma, cond):
        u = denoiser(x, sigma, cond["uncond"])
        c = denoiser(x, sigma, cond["cond"])
        return u + scale * (c - u)

    return guide


def test_guider_steps_warmup_and_momentum() -> None:
    """The guider over 4 sampler steps, one with a second (Heun-like) evaluation, against the equations."""
    params = SLDParams(guidance_scale=500.0, warmup_steps=2, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    steps, s_g, shape = 4, 5.0, (2, 3, 2, 2)
    n = 24
    eps_u, eps_p, eps_s = make_predictions(steps, n, seed=7)
    expected = reference_sld(
        eps_u.tolist(), eps_p.tolist(), eps_s.tolist(), steps, s_g, 500.0, 2, 0.01, 0.3, 0.4
    )
    den = TableDenoiser()
    guider = SLDGuider(den, s_g, params)
    assert guider.enabled
    callback = guider.wrap_callback(None)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = [14.6, 7.0, 2.0, 0.5]
    for i in range(steps):
        cond = {
            "uncond": {"crossattn": eps_u[i].reshape(shape)},
            "cond": {"crossattn": eps_p[i].reshape(shape)},
            "safety": {"crossattn": eps_s[i].reshape(shape)},
        }
        sigma = torch.full((2,), sigmas[i], dtype=torch.float64)
        x0 = guider(x, sigma, cond)
        eps = (x - x0) / sigmas[i]
        torch.testing.assert_close(eps.flatten(), torch.tensor(expected[i], dtype=torch.float64), rtol=1e-9, atol=1e-9)
        if i == 1:
            # a second evaluation within the step (other x, sigma and predictions) uses the step's index
            # and momentum, and does not move the momentum: later steps still match the reference
            other_s = eps_s.clone()
            other_s[1] = eps_p[1] - 0.004
            cond2 = dict(cond, safety={"crossattn": other_s[1].reshape(shape)})
            expected2 = reference_sld(
                eps_u[:2].tolist(), eps_p[:2].tolist(), other_s[:2].tolist(), 2, s_g, 500.0, 2, 0.01, 0.3, 0.4
            )[1]
            x2 = x * 0.5
            x0b = guider(x2, sigma / 2, cond2)
            eps2 = (x2 - x0b) / (sigmas[i] / 2)
            expected2 = torch.tensor(expected2, dtype=torch.float64)
            torch.testing.assert_close(eps2.flatten(), expected2, rtol=1e-9, atol=1e-9)
        callback({"i": i, "x": x})
    # one batched call per evaluation: [uncond, prompt, safety]
    assert den.calls == [6] * (steps + 1)
    assert guider.step == steps
    guider.reset()
    assert guider.step == 0 and guider.momentum is None


def test_guider_requires_step_callback() -> None:
    params = SLDParams(guidance_scale=500.0, warmup_steps=2)
    guider = SLDGuider(TableDenoiser(), 7.5, params)
    z = torch.zeros(1, 1, 2, 2)
    cond = {"uncond": {"crossattn": z}, "cond": {"crossattn": z}, "safety": {"crossattn": z}}
    with pytest.raises(RuntimeError, match="callback"):
        for _ in range(10):
            guider(z + 1, torch.ones(1), cond)


@pytest.mark.parametrize("s_s, s_g", [(0.0, 7.5), (1.0, 7.5), (1000.0, 1.0)])
def test_guider_inactive_is_plain_cfg(s_s: float, s_g: float) -> None:
    """s_S <= 1 or no CFG: the authors' pipeline runs without safety guidance; so does the guider."""
    params = SLDParams(guidance_scale=s_s)
    assert not sld_enabled(params, s_g)
    den = TableDenoiser()
    guider = SLDGuider(den, s_g, params, fallback=plain_cfg(den, s_g))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g)
    cond = {k: {"crossattn": torch.randn(2, 4, 3, 3, generator=g)} for k in ("uncond", "cond", "safety")}
    sigma = torch.tensor([3.0, 3.0])
    assert torch.equal(guider(x, sigma, cond), plain_cfg(den, s_g)(x, sigma, cond))


def test_guider_scale_zero_equals_cfg_denoiser() -> None:
    """With SLD guidance scale 0 the guider's output is bit-identical to the CFG guider's."""
    guidance = pytest.importorskip("ldm.sampling.guidance")
    den = TableDenoiser()
    params = SLDParams(guidance_scale=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g)
    cond = {k: {"crossattn": torch.randn(2, 4, 3, 3, generator=g)} for k in ("uncond", "cond", "safety")}
    sigma = torch.tensor([3.0, 3.0])
    expected = guidance.CFGDenoiser(den, 7.5)(x, sigma, {"cond": cond["cond"], "uncond": cond["uncond"]})
    assert torch.equal(SLDGuider(den, 7.5, params)(x, sigma, cond), expected)


# ---------------------------------------------------------------- presets


def test_presets_match_model_card() -> None:
    card = {
        "weak": (15, 200.0, 0.0, 0.0, 0.0),
        "medium": (10, 1000.0, 0.01, 0.3, 0.4),
        "strong": (7, 2000.0, 0.025, 0.5, 0.7),
        "max": (0, 5000.0, 1.0, 0.5, 0.7),
    }
    assert set(PRESET_NAMES) == set(card)
    for name, values in card.items():
        p = load_preset(name)
        assert (p.warmup_steps, p.guidance_scale, p.threshold, p.momentum_scale, p.momentum_beta) == values
        assert isinstance(p.warmup_steps, int)
        assert p.safety_concept == DEFAULT_SAFETY_CONCEPT
    assert load_preset("MEDIUM") == SLDParams()


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(SdgenError, match="weak, medium, strong, max"):
        load_preset("extreme")


def test_resolve_overrides_and_concept(tmp_path: Path) -> None:
    p = resolve_sld_params("strong", guidance_scale=3000.0, safety_concept="violence, blood", warmup_steps=None)
    assert p.guidance_scale == 3000.0 and p.warmup_steps == 7 and p.safety_concept == "violence, blood"
    assert resolve_sld_params() == load_preset("medium")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        "sld:\n  warmup_steps: 3\n  guidance_scale: 10\n  threshold: 0.1\n  momentum_scale: 0\n"
        "  momentum_beta: 0.5\n  safety_concept: gore\n"
    )
    p = resolve_sld_params(config_path=cfg, threshold=0.2)
    assert p == SLDParams(guidance_scale=10.0, warmup_steps=3, threshold=0.2, momentum_scale=0.0,
                          momentum_beta=0.5, safety_concept="gore")
    with pytest.raises(SdgenError, match="not both"):
        resolve_sld_params("weak", config_path=cfg)


def test_bad_config_fields_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("warmup_steps: 2.5\nguidance_scale: high\nthreshold: 0.1\nmomentum_beta: 0.3\nmomentum: 1\n")
    with pytest.raises(SdgenError) as info:
        load_sld_config(cfg)
    msg = str(info.value)
    assert "missing field(s) momentum_scale" in msg
    assert "unknown field(s) momentum" in msg
    assert "'warmup_steps' must be an integer" in msg
    assert "'guidance_scale' must be a number" in msg
    with pytest.raises(SdgenError, match="not found"):
        load_sld_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"momentum_beta": 1.0}, "momentum_beta must be in [0, 1)"),
        ({"momentum_beta": -0.1}, "momentum_beta must be in [0, 1)"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"warmup_steps": -2}, "warmup_steps must be >= 0"),
        ({"safety_concept": "  "}, "safety_concept must not be empty"),
    ],
)
def test_invalid_values(change: dict, needle: str) -> None:
    with pytest.raises(SdgenError) as info:
        load_preset("medium").replace(**change)
    assert needle in str(info.value)


# ---------------------------------------------------------------- with the real denoiser and samplers


def _alphas_cumprod() -> torch.Tensor:
    from ldm.sampling.schedules import alphas_cumprod_from_betas, make_beta_schedule

    return torch.tensor(alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012)),
                        dtype=torch.float32)


def _bias_net(x_in: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A toy network: its prediction is an affine function of the input, shifted by the cond tensor."""
    return 0.3 * x_in + cond["crossattn"]


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_guider_on_eps_and_v_denoisers(parameterization: str) -> None:
    """The guider works on eps recovered from x0, i.e. the network's eps, or eps implied by v."""
    from ldm.sampling.denoiser import Denoiser

    den = Denoiser(_bias_net, _alphas_cumprod(), parameterization, "interpolate")
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    c_u, c_p = torch.zeros(shape, dtype=torch.float64), 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    c_s = c_p + 0.004 * torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.full((2,), 2.5, dtype=torch.float64)
    params = SLDParams(guidance_scale=300.0, warmup_steps=0, threshold=0.002, momentum_scale=0.3, momentum_beta=0.4)
    out = SLDGuider(den, 6.0, params)(x, sigma, {"uncond": {"crossattn": c_u}, "cond": {"crossattn": c_p},
                                                 "safety": {"crossattn": c_s}})
    s = 2.5
    x_t = x / (1 + s**2) ** 0.5  # the VP input the network sees
    alpha, sig = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5

    def eps_of(c: torch.Tensor) -> torch.Tensor:
        raw = _bias_net(x_t, None, {"crossattn": c})
        return raw if parameterization == "eps" else alpha * raw + sig * x_t  # eps = sqrt(ab) v + sqrt(1-ab) x_t

    expected, _ = sld_combine(eps_of(c_u), eps_of(c_p), eps_of(c_s), torch.zeros(shape, dtype=torch.float64),
                              0, 6.0, params)
    torch.testing.assert_close((x - out) / s, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral", "heun"])
def test_every_sampler_counts_sampler_steps(sampler: str) -> None:
    """With warm-up = all steps SLD changes nothing (warm-up counts sampler steps, not network calls);
    with no warm-up it moves the result."""
    from ldm.sampling.denoiser import Denoiser
    from ldm.sampling.guidance import CFGDenoiser
    from ldm.sampling.noise import BatchedNoiseSampler, initial_noise
    from ldm.sampling.grids import default_time_mode, sampler_sigmas
    from tests.golden import sample

    ac = _alphas_cumprod()
    sigmas = sampler_sigmas(sampler, ac, 5)
    n_steps = len(sigmas) - 1
    den = Denoiser(_bias_net, ac, "eps", default_time_mode(sampler))
    shape = (4, 6, 6)
    g = torch.Generator().manual_seed(3)
    c_p = 0.2 * torch.randn(2, *shape, generator=g)
    cond = {"uncond": {"crossattn": torch.zeros(2, *shape)}, "cond": {"crossattn": c_p},
            "safety": {"crossattn": c_p + 0.01 * torch.randn(2, *shape, generator=g)}}

    def run(guider, callback=None):
        noise = initial_noise(shape, [5, 6])
        return sample(sampler, guider, noise, sigmas, extra_args={"cond": cond}, callback=callback,
                      noise_sampler=BatchedNoiseSampler([5, 6], shape))

    reference = run(CFGDenoiser(den, 7.5))
    warm = SLDGuider(den, 7.5, SLDParams(guidance_scale=1000.0, warmup_steps=n_steps))
    steps_seen: list[int] = []
    out = run(warm, warm.wrap_callback(lambda info: steps_seen.append(info["i"])))
    assert steps_seen == list(range(n_steps)) and warm.step == n_steps
    assert warm.momentum is not None and warm.momentum.abs().sum() > 0  # momentum built up during warm-up
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    active = SLDGuider(den, 7.5, SLDParams(guidance_scale=1000.0, warmup_steps=0))
    moved = run(active, active.wrap_callback(None))
    assert (moved - reference).abs().max() > 1e-2
