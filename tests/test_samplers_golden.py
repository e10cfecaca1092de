"""Samplers against the golden vectors of the original code (tests/data/golden/README.md).

Each case builds the tiny reference UNet from the case yaml, loads its reference weights and wraps it as
``net(x, t, cond) = unet(x, t, context=cond["crossattn"], y=cond.get("vector"))``; the samplers then run with
the denoiser / guider / grid of ldm.sampling and must reproduce the originals' final latents.

Tolerance (SAMPLERS, through tests/tolerance.py): max |ours - reference| / max |reference| <= 2e-6 (README:
~1e-5). Reached on the recording CPU (AMX): sd1 ddim10 4.5e-7, ddim7 3.7e-7, plms10 6.8e-7, dpmsolver10 6.5e-7,
img2img 4.6e-7 (z_enc bit-exact); sd2v ddim10 4.8e-7; unclip-l ddim10 (v + ADM vector); sdxl-base euler10 2.0e-7,
sdxl-base@081e0d4 1.1e-7, sdxl-refiner 1.3e-7; SGM denoiser outputs <= 4.7e-7. The differences are float32
rounding: the reference runs in VP space, these samplers in VE space (a float64 run of ours differs from the
reference by the same amount); another CPU's kernels add rounding of the same size (AMD EPYC, AVX2 only: at
most 7.3e-7, plms10; SGM denoiser outputs 6.2e-7). A wrong parameterization or grid is off by over 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.sampling import grids
from ldm.sampling import samplers as smp
from ldm.sampling import schedules
from ldm.sampling.denoiser import Denoiser, DiscreteDenoiser
from ldm.sampling.guidance import CFGDenoiser
from ldm.util import instantiate_from_config
from tests.golden import case_config, case_data, case_state_dict, sample, sub_state_dict
from tests.tolerance import IEEE_EXACT, SGM_SIGMAS, Tolerance, assert_matches_recorded

RTOL = 2e-6
SAMPLERS = Tolerance(why="10 float32 sampler steps of a tiny UNet in VE instead of VP space, on another CPU's "
                         "kernels: a few ulps of the largest value per step", rel_max=RTOL)
SCALE = 5.0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


class RecordingNet:
    """The case's UNet as ``net(x, t, cond)``, recording the times it is called with."""

    def __init__(self, case: str) -> None:
        params = case_config(case).model.params
        unet_cfg = params.get("unet_config") or params.get("network_config")
        self.unet = UNetModel(**OmegaConf.to_container(unet_cfg.params)).eval()
        self.unet.load_state_dict(sub_state_dict(case_state_dict(case), "model.diffusion_model."))
        self.times: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.times.append(t.clone())
        return self.unet(x, t, context=cond["crossattn"], y=cond.get("vector"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNets gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nets():
    cache: dict[str, RecordingNet] = {}

    def get(case: str) -> RecordingNet:
        if case not in cache:
            cache[case] = RecordingNet(case)
        cache[case].times = []
        return cache[case]

    return get


def text_cond(d) -> dict:
    return {"cond": {"crossattn": d["c"]}, "uncond": {"crossattn": d["uc"]}}


def run(name: str, case: str, net: RecordingNet, steps: int, parameterization: str = "eps", cond=None, **options):
    d = case_data(case)
    acp = d["alphas_cumprod"]
    sigmas = grids.sampler_sigmas(name, acp, steps)
    den = CFGDenoiser(Denoiser(net, acp, parameterization, grids.default_time_mode(name)), SCALE)
    return sample(name, den, d["x_T"], sigmas, extra_args={"cond": cond or text_cond(d)}, **options)


@pytest.mark.parametrize("name,key,steps", [("ddim", "ddim10", 10), ("ddim", "ddim7", 7), ("plms", "plms10", 10)])
def test_sd1_ddim_and_plms(nets, name, key, steps):
    d = case_data("sd1")
    net = nets("sd1")
    out = run(name, "sd1", net, steps)
    assert_matches_recorded(out, d[f"{key}.out"], SAMPLERS)
    # the UNet sees exactly the CompVis integer timesteps, highest first (PLMS: the 2nd one twice)
    seen = [int(t[0]) for t in net.times]
    expect = d[f"{key}.timesteps"].flip(0).tolist()
    if name == "plms":
        expect = expect[:1] + expect[1:2] + expect[1:]
    assert seen == expect
    assert all(t.dtype == torch.int64 and t.shape == (2,) for t in net.times)


def test_sd1_dpm_solver(nets):
    d = case_data("sd1")
    net = nets("sd1")
    out = run("dpmpp_2m", "sd1", net, 10)
    assert_matches_recorded(out, d["dpmsolver10.out"], SAMPLERS)
    # continuous network time (t - 1/N) * 1000 as float: 999.0, 899.1, ..., 99.9
    seen = torch.stack([t[0] for t in net.times]).double()
    assert net.times[0].dtype == torch.float32
    assert torch.allclose(seen, 999.0 - 99.9 * torch.arange(10, dtype=torch.float64), atol=2e-3)
    # the original is the lower_order_final variant: the alternative is much further away
    other = run("dpmpp_2m", "sd1", net, 10, lower_order_final=False)
    assert rel_err(other, d["dpmsolver10.out"]) > 3 * rel_err(out, d["dpmsolver10.out"])


def test_sd1_img2img(nets):
    d = case_data("sd1")
    acp = d["alphas_cumprod"]
    sigmas = grids.sampler_sigmas("ddim", acp, 10)
    sigma_noise, run_sigmas = schedules.compvis_img2img_sigmas(sigmas, 0.5, 10)
    z_enc = schedules.compvis_stochastic_encode(d["img2img.z0"], d["img2img.noise"], sigma_noise)
    assert_matches_recorded(z_enc, d["img2img.z_enc"], SAMPLERS)
    net = nets("sd1")
    den = CFGDenoiser(Denoiser(net, acp, "eps", "integer"), SCALE)
    x = smp.sample_ddim(den, schedules.vp_to_ve(z_enc, run_sigmas[0]), run_sigmas, extra_args={"cond": text_cond(d)})
    out = grids.final_latent(x, run_sigmas)
    assert_matches_recorded(out, d["img2img.out"], SAMPLERS)
    assert [int(t[0]) for t in net.times] == [401, 301, 201, 101, 1]


def test_sd2v_ddim_v_prediction(nets):
    d = case_data("sd2v")
    net = nets("sd2v")
    assert_matches_recorded(run("ddim", "sd2v", net, 10, parameterization="v"), d["ddim10.out"], SAMPLERS)
    # the parameterization matters: reading v as eps is far off
    assert rel_err(run("ddim", "sd2v", net, 10, parameterization="eps"), d["ddim10.out"]) > 1e-2


def test_unclip_ddim_with_adm_vector(nets):
    d = case_data("unclip-l")
    adm = d["noise_aug.level100.adm"]
    cond = {
        "cond": {"crossattn": d["c"], "vector": adm},
        "uncond": {"crossattn": d["uc"], "vector": torch.zeros_like(adm)},  # zeros, as the streamlit demo does
    }
    net = nets("unclip-l")
    out = run("ddim", "unclip-l", net, 10, parameterization="v", cond=cond)
    assert_matches_recorded(out, d["ddim10.out"], SAMPLERS)
    assert [int(t[0]) for t in net.times] == d["ddim10.timesteps"].flip(0).tolist()


def sgm_denoiser(case: str) -> DiscreteDenoiser:
    """The yaml's ``denoiser_config`` (an ``sgm.*`` target) instantiated through the alias table."""
    return instantiate_from_config(case_config(case).model.params.denoiser_config)


def sdxl_cond(d) -> dict:
    return {
        "cond": {"crossattn": d["c_crossattn"], "vector": d["c_vector"]},
        "uncond": {"crossattn": d["uc_crossattn"], "vector": d["uc_vector"]},
    }


@pytest.mark.parametrize("case", ["sdxl-base", "sdxl-base-081e0d4", "sdxl-refiner"])
def test_sdxl_denoiser(nets, case):
    d = case_data(case)
    den = sgm_denoiser(case)
    assert isinstance(den, DiscreteDenoiser)
    assert_matches_recorded(den.sigmas, d["denoiser.sigmas_table"], SGM_SIGMAS)
    assert den.state_dict().keys() == {"sigmas"}  # checkpoint key denoiser.sigmas
    net = nets(case)
    cond = {"crossattn": d["unet.context"], "vector": d["unet.y"]}
    out = den(net, d["unet.x"], d["denoiser.sigma"], cond)
    assert_matches_recorded(out, d["denoiser.out"], SAMPLERS)
    assert net.times[0].tolist() == [999, 1]
    # nearest-sigma quantization: a sigma between two table entries is replaced by the nearer one
    between = (den.sigmas[[500]] * 0.7 + den.sigmas[[501]] * 0.3).repeat(2)
    exact = den(net, d["unet.x"], den.sigmas[[500]].repeat(2), cond)
    assert torch.equal(den(net, d["unet.x"], between, cond), exact)


@pytest.mark.parametrize("case,legacy", [("sdxl-base", False), ("sdxl-base-081e0d4", True), ("sdxl-refiner", False)])
def test_sdxl_euler(nets, case, legacy):
    d = case_data(case)
    disc = schedules.LegacyDDPMDiscretization(legacy_range=legacy)
    sigmas = grids.grid_sigmas("sgm_legacy" if legacy else "sgm", disc.alphas_cumprod, 10)
    assert_matches_recorded(sigmas, d["euler10.sigmas"], SGM_SIGMAS)
    net = nets(case)
    den = CFGDenoiser(sgm_denoiser(case).bind(net), SCALE)
    out = sample("euler", den, d["x_T"], sigmas, extra_args={"cond": sdxl_cond(d)})
    assert_matches_recorded(out, d["euler10.out"], SAMPLERS)
    assert [int(t[0]) for t in net.times] == d["euler10.timesteps"].tolist()
