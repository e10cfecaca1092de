"""The full SDXL DiffusionEngine against the golden vectors of the original SGM code (golden README 4, 5).

The engine is built from the reference yaml itself (upstream ``sgm.*`` targets, through the alias table) with the
tiny encoder sizes, loaded strictly with the golden weights, and driven through its own API: conditioner ->
``get_cond_uncond`` -> ``make_denoiser`` -> CFG -> Euler on ``get_sigmas`` grids.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.models.diffusion.engine import DiffusionEngine, MicroConditioning
from ldm.sampling.guidance import CFGDenoiser
from ldm.defaults import FAMILY_DEFAULTS
from ldm.sampling.grids import grid_sigmas
from tests.golden import case_config, case_data, case_state_dict, fourier_tolerance, sample
from tests.tolerance import IEEE_EXACT, SGM_SIGMAS, Tolerance, assert_matches_recorded

TINY = {"sdxl-base": "configs/tests/sdxl-base-tiny.yaml", "sdxl-refiner": "configs/tests/sdxl-refiner-tiny.yaml"}
#: a tiny SGM UNet in float32 (one call, or ten Euler steps with CFG 5): matmul / convolution sums blocked per CPU
#: differ by a few ulps per operation; measured at most 4.7e-7 of the output's largest value (AMX CPU and AMD
#: EPYC AVX2 alike), bound 1e-5. A wrong scaling, timestep or sigma grid is off by 1e-2 or more.
NETWORK = Tolerance(why="tiny float32 UNet (+ 10 Euler steps): kernel summation order per CPU", rel_max=1e-5)


def golden_engine_config(case: str):
    """The case's reference yaml with the tiny encoder sizes put into the encoders' params."""
    cfg = case_config(case)
    sizes = OmegaConf.to_container(cfg.golden_tiny_encoder_sizes)
    model = OmegaConf.to_container(cfg.model)
    for emb in model["params"]["conditioner_config"]["params"]["emb_models"]:
        if emb["target"].endswith("FrozenCLIPEmbedder"):
            emb["params"]["text_config"] = sizes["hf_clip_text"]
        elif emb["target"].endswith("FrozenOpenCLIPEmbedder2"):
            emb["params"]["model_cfg"] = sizes["openclip_overrides"][emb["params"]["arch"]]
    return OmegaConf.create({"model": model})


def load_engine(config, case: str) -> DiffusionEngine:
    model = build_model_on_meta(config)
    return assign_state_dict(model, dict(case_state_dict(case)), source=case)


@lru_cache(maxsize=None)
def golden_engine(case: str) -> DiffusionEngine:
    return load_engine(golden_engine_config(case), case)


@pytest.fixture(scope="module", params=["sdxl-base", "sdxl-base-081e0d4", "sdxl-refiner"])
def golden(request):
    case = request.param
    return case, golden_engine(case), case_data(case)


def cond_dicts(data):
    cond = {"crossattn": data["c_crossattn"], "vector": data["c_vector"]}
    uncond = {"crossattn": data["uc_crossattn"], "vector": data["uc_vector"]}
    return cond, uncond


def test_engine_from_reference_yaml_has_the_golden_layout(golden):
    case, engine, data = golden
    assert isinstance(engine, DiffusionEngine)
    assert engine.scale_factor == 0.13025
    assert engine.disable_first_stage_autocast is True
    assert engine.parameterization == "eps"
    assert_matches_recorded(engine.denoiser.sigmas, data["denoiser.sigmas_table"], SGM_SIGMAS)
    assert engine.is_refiner == (case == "sdxl-refiner")


@pytest.mark.parametrize("case", ["sdxl-base", "sdxl-refiner"])
def test_tiny_test_config_loads_the_golden_weights_strictly(case):
    engine = load_engine(load_config(TINY[case]), case)
    expected = dict(case_state_dict(case))
    got = engine.state_dict()
    assert sorted(got) == sorted(expected)
    # the loaded tensors are the dict's own values (random ones drawn here, buffers from the file): exact anywhere
    assert all(torch.equal(got[k].float(), expected[k].float()) for k in expected)


def test_apply_model_equals_golden_unet(golden):
    _, engine, data = golden
    out = engine.apply_model(data["unet.x"], data["unet.t"], {"crossattn": data["unet.context"], "vector": data["unet.y"]})
    assert_matches_recorded(out, data["unet.out"], NETWORK)


def test_denoiser_equals_golden(golden):
    _, engine, data = golden
    cond = {"crossattn": data["unet.context"], "vector": data["unet.y"]}
    out = engine.make_denoiser()(data["unet.x"], data["denoiser.sigma"], cond)
    assert_matches_recorded(out, data["denoiser.out"], NETWORK)


def test_euler10_grid_and_result_equal_golden(golden):
    case, engine, data = golden
    grid = "sgm_legacy" if case.endswith("081e0d4") else "sgm"
    sigmas = grid_sigmas(grid, engine.alphas_cumprod, 10)
    assert_matches_recorded(sigmas, data["euler10.sigmas"], SGM_SIGMAS)
    table = engine.denoiser.sigmas
    idx = (sigmas[:-1, None] - table[None, :]).abs().argmin(dim=1)
    assert_matches_recorded(idx, data["euler10.timesteps"], IEEE_EXACT)
    cond, uncond = cond_dicts(data)
    guider = CFGDenoiser(engine.make_denoiser(), 5.0)
    out = sample("euler", guider, data["x_T"], sigmas, extra_args={"cond": {"cond": cond, "uncond": uncond}})
    assert_matches_recorded(out, data["euler10.out"], NETWORK)


def test_the_other_grid_gives_a_different_result():
    data = case_data("sdxl-base")
    engine = golden_engine("sdxl-base")
    legacy = case_data("sdxl-base-081e0d4")["euler10.sigmas"]
    assert_matches_recorded(grid_sigmas("sgm_legacy", engine.alphas_cumprod, 10), legacy, SGM_SIGMAS)
    assert (grid_sigmas("sgm", engine.alphas_cumprod, 10)[1:-1] / legacy[1:-1] - 1).abs().min() > 1e-3
    assert FAMILY_DEFAULTS["txt2img"]["sdxl"]["grid"] == "sgm"  # the documented default
    assert_matches_recorded(grid_sigmas("sgm", engine.alphas_cumprod, 10), data["euler10.sigmas"], SGM_SIGMAS)


def test_base_conditioning_vector_fourier_and_zero_uncond():
    engine, data = golden_engine("sdxl-base"), case_data("sdxl-base")
    micro = MicroConditioning(original_size=(1024, 768), crop_coords=(0, 0), target_size=(1024, 768))
    cond, uncond = engine.get_cond_uncond(["a lighthouse at dusk"], [""], micro)
    assert cond["crossattn"].shape == (1, 77, 64) and cond["vector"].shape == (1, 1552)
    assert_matches_recorded(cond["vector"][:, 16:], data["vector_fourier"], fourier_tolerance(data, "vector_fourier"))
    # SGM base: force_uc_zero_embeddings=["txt"] zeroes the context and the pooled part, not the sizes
    assert torch.count_nonzero(uncond["crossattn"]) == 0
    assert torch.count_nonzero(uncond["vector"][:, :16]) == 0
    assert torch.equal(uncond["vector"][:, 16:], cond["vector"][:, 16:])
    assert torch.count_nonzero(cond["vector"][:, :16]) == 16


def test_refiner_conditioning_aesthetic_scores_and_encoded_negative():
    engine, data = golden_engine("sdxl-refiner"), case_data("sdxl-refiner")
    micro = MicroConditioning(original_size=(1024, 768), crop_coords=(0, 0), aesthetic_score=6.0,
                              negative_aesthetic_score=2.5)
    cond, uncond = engine.get_cond_uncond(["a lighthouse at dusk"], [""], micro)
    assert cond["crossattn"].shape == (1, 77, 32) and cond["vector"].shape == (1, 1296)
    for vector, name in ((cond["vector"], "vector_fourier.aes6"), (uncond["vector"], "vector_fourier.aes2_5")):
        assert_matches_recorded(vector[:, 16:], data[name], fourier_tolerance(data, name), name)
    # the refiner encodes the (empty) negative prompt: equal to the conditional encoding of ""
    empty, _ = engine.get_cond_uncond([""], [""], micro)
    # both encodings computed here: exact
    torch.testing.assert_close(uncond["crossattn"], empty["crossattn"], rtol=0, atol=0)
    torch.testing.assert_close(uncond["vector"][:, :16], empty["vector"][:, :16], rtol=0, atol=0)
    assert torch.count_nonzero(uncond["crossattn"]) > 0
