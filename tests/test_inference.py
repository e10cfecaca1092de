"""How a loaded model is prepared to run: bf16 weights, channels_last, tiled VAE decoding, the precision hint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.generation import inference
from ldm.generation.generate import generate
from ldm.generation.request import Settings, make_jobs
from ldm.generation.stages import build_stages
from ldm.models.vae_tiling import Tiling, tiled_decode
from tests.conftest import REPO, randomized_state_dict

FAMILIES = {"sd1-tiny": 16, "sd2v-tiny": 32, "sdxl-base-tiny": 32}
# mean |bf16 - fp32| of two 4-step images per family, 8-bit levels, measured: sd1 2.9, sd2v (v-prediction) 5.8,
# SDXL base 2.7 (random tiny weights exaggerate it); the bound is 1.5x that
BF16_TOLERANCE_LEVELS = {"sd1-tiny": 4.5, "sd2v-tiny": 8.5, "sdxl-base-tiny": 4.0}


def tiny(name: str):
    model = build_model_on_meta(load_config(REPO / "configs" / "tests" / f"{name}.yaml"))
    return assign_state_dict(model, randomized_state_dict(model, seed=5), source=name)


def test_tiles_blend_to_a_partition_of_unity():
    """With a decoder that is local (nearest upsampling) the tiled result is the whole one, for any size."""
    def decode(z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    for height, width in [(40, 46), (70, 76), (120, 126), (31, 200)]:
        z = torch.randn(2, 4, height, width)
        torch.testing.assert_close(tiled_decode(decode, z, 8, Tiling(32, 8)), decode(z), rtol=0, atol=1e-6)


def test_a_tiled_decode_stays_close_to_the_whole_one_and_small_images_are_untouched():
    """The group norms and the mid-block attention see one tile at a time, so a tiled decode differs from the
    whole one; measured on the tiny VAE (48 x 48 latents, output std 1.0): mean |difference| 0.11 with 24-pixel
    tiles, 0.066 with 32, 0.032 with 40 (overlap 16): it shrinks as the tiles grow."""
    vae = tiny("sd1-tiny").first_stage_model
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    differences = []
    with torch.no_grad():
        whole = vae.decode(z)
        for tile, overlap in ((24, 8), (32, 16), (40, 16)):
            vae.tiling = Tiling(tile, overlap)
            differences.append(float((vae.decode(z) - whole).abs().mean() / whole.std()))
        small = vae.decode(z[:, :, :24, :24])
        vae.tiling = None
        assert torch.equal(small, vae.decode(z[:, :, :24, :24]))  # one tile: decoded whole, unchanged
    assert differences[0] > differences[1] > differences[2]
    assert differences[1] < 0.1 and differences[2] < 0.05, differences


def images(model, size: int, precision: str) -> np.ndarray:
    grid = "sgm" if hasattr(model, "conditioner") else "ddim"
    settings = Settings(sampler="euler" if grid == "sgm" else "ddim", steps=4, grid=grid, scale=5.0, height=size,
                        width=size, factor=2, precision=precision)
    stages, _ = build_stages([("base" if grid == "sgm" else "model", model)], settings)
    jobs = make_jobs([["a red cube"] * 2], 1, 3)
    return np.stack([image.pixels for image in generate(stages, jobs, settings)]).astype(float)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_runs_bf16_weights_and_stays_close_to_fp32(family):
    model = tiny(family)
    size = FAMILIES[family]
    full = images(model, size, "full")
    inference.prepare_for_inference(model, "bf16", torch.device("cpu"))
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    text = model.conditioner if hasattr(model, "conditioner") else model.cond_stage_model
    assert {p.dtype for p in text.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.first_stage_model.parameters()} == {torch.float32}
    unet = model.model.diffusion_model
    assert unet.channels_last and unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    half = images(model, size, "bf16")
    assert np.abs(half - full).mean() < BF16_TOLERANCE_LEVELS[family]
    assert (half != full).any()


def test_float32_keeps_the_contiguous_layout():
    model = inference.prepare_for_inference(tiny("sd1-tiny"), "full", torch.device("cpu"))
    assert not model.model.diffusion_model.channels_last
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_bf16_hint_only_for_float32_cpu_runs_on_a_bf16_cpu(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert "--precision bf16" in inference.precision_hint("autocast", torch.device("cpu"))
    assert inference.precision_hint("bf16", torch.device("cpu")) is None
    assert inference.precision_hint("autocast", torch.device("cuda")) is None
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.precision_hint("full", torch.device("cpu")) is None
