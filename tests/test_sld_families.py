"""Safe Latent Diffusion on every model family through the one guider: SD 1.x, SD 2.x (v), unCLIP and SDXL. The
safety term changes the images, and an SLD guidance scale of 0 is plain classifier-free guidance, bit for bit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.generation.generate import generate
from ldm.generation.request import Settings, make_jobs
from ldm.generation.stages import build_stages
from ldm.sampling.sld import SLDGuidance
from ldm.sld_config import load_preset
from tests.conftest import REPO, randomized_state_dict

TINY = REPO / "configs" / "tests"
FAMILIES = {  # config, latent multiple (pixels), grid of the sampler used
    "sd1": ("sd1-tiny", 16, "ddim"),
    "sd2v": ("sd2v-tiny", 32, "ddim"),
    "unclip-h": ("unclip-h-tiny", 32, "ddim"),
    "sdxl-base": ("sdxl-base-tiny", 32, "sgm"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    config, size, grid = FAMILIES[request.param]
    model = build_model_on_meta(load_config(TINY / f"{config}.yaml"))
    model = assign_state_dict(model, randomized_state_dict(model, seed=3), source=config)
    return request.param, model, size, grid


def images(family, sld_guidance_scale: float | None) -> list[np.ndarray]:
    """Two images of the family's tiny model with plain CFG (None) or SLD at the given safety scale."""
    name, model, size, grid = family
    settings = Settings(sampler="euler" if grid == "sgm" else "ddim", steps=4, grid=grid, scale=7.5, height=size,
                        width=size, factor=2, precision="full")
    guidance = None
    if sld_guidance_scale is not None:
        params = replace(load_preset("max"), guidance_scale=sld_guidance_scale, warmup_steps=0,
                         safety_concept="a red cube")
        guidance = SLDGuidance(params, "test")
    init = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1] if name == "unclip-h" else []
    stages, _ = build_stages([("base" if name == "sdxl-base" else "model", model)], settings, init)
    jobs = make_jobs([["a red cube on a table"] * 2], 1, 5, init_images=[0 if init else None])
    return [image.pixels for image in generate(stages, jobs, settings, guidance=guidance)]


def test_sld_changes_the_images_and_scale_zero_is_plain_cfg(family):
    plain = images(family, None)
    off = images(family, 0.0)
    on = images(family, 5000.0)
    for a, b in zip(plain, off):
        np.testing.assert_array_equal(a, b)  # SLD switched off by its scale: exactly classifier-free guidance
    for a, b in zip(plain, on):  # the safety term moves the images a long way (mean |difference| > 5 levels)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5, family[0]
