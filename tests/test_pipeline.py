"""The generation library (ldm.generation) on the tiny SD 1.x model, CPU: jobs, the loop, img2img, precision,
model files and the defaults table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import model_files
from ldm.defaults import defaults_for
from ldm.errors import SdgenError
from ldm.generation.api import generate_images
from ldm.generation.generate import generate, precision_context
from ldm.generation.images import image_to_tensor
from ldm.generation.request import Settings, make_jobs, prompt_batches
from ldm.generation.stages import build_stages
from ldm.sampling import schedules
from ldm.sampling.grids import img2img_sigmas, sampler_sigmas

TINY = dict(steps=4, height=16, width=16, scale=5.0)


def pixels(model, prompt="a red cube", **kw) -> list[np.ndarray]:
    return [image.pixels for image in generate_images(model, prompt, **{**TINY, **kw})]


def test_jobs_give_each_image_its_seed_and_prompt():
    jobs = make_jobs(prompt_batches(["p"], 3, per_image=False), 2, 10)
    assert [[j.seed for j in b] for b in jobs] == [[10, 11, 12], [13, 14, 15]]
    assert [j.index for b in jobs for j in b] == list(range(6))
    fixed = make_jobs(prompt_batches(["p"], 3, per_image=False), 2, 10, fixed_code=True)
    assert [[j.seed for j in b] for b in fixed] == [[10, 11, 12], [10, 11, 12]]

    from_file = make_jobs(prompt_batches(["a", "b", "c"], 2, per_image=True), 2, 42, negative_prompt="n")
    assert [[(j.prompt, j.seed, j.position, j.batch) for j in b] for b in from_file] == [
        [("a", 42, 0, 0), ("b", 43, 1, 0)], [("c", 44, 0, 1)], [("a", 45, 0, 2), ("b", 46, 1, 2)], [("c", 47, 0, 3)]
    ]
    assert {j.negative_prompt for b in from_file for j in b} == {"n"}
    with pytest.raises(SdgenError):
        prompt_batches([], 2, per_image=True)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_image_regenerates_alone_with_its_seed(tiny_model, sampler):
    """Image 2 of a batch of 3 (seed 42 + 2) equals a run of seed 44 alone; ancestral noise is per image too."""
    batch = pixels(tiny_model, n=3, sampler=sampler)
    alone = pixels(tiny_model, seed=44, sampler=sampler)
    diff = np.abs(batch[2].astype(int) - alone[0].astype(int))
    assert diff.max() <= 1, "batch position changed the image"  # float rounding of batched kernels at most
    assert np.abs(batch[0].astype(int) - batch[2].astype(int)).max() > 10, "different seeds gave the same image"


def test_prompt_negative_prompt_and_scale_reach_the_model(tiny_model):
    base = pixels(tiny_model)
    assert np.array_equal(base[0], pixels(tiny_model)[0]), "not deterministic"
    assert not np.array_equal(base[0], pixels(tiny_model, "a blue sphere")[0])
    assert not np.array_equal(base[0], pixels(tiny_model, negative_prompt="blurry")[0])
    # scale 1: no unconditional branch, so the negative prompt has no effect
    plain = pixels(tiny_model, scale=1.0)
    assert np.array_equal(plain[0], pixels(tiny_model, scale=1.0, negative_prompt="blurry")[0])


def test_generate_reports_steps_and_batches(tiny_model):
    steps, batches = [], []
    settings = Settings(sampler="plms", grid="ddim", factor=2, **TINY)
    stages, _ = build_stages([("model", tiny_model)], settings)
    jobs = make_jobs([["a", "b"], ["c"]], 1, 42)
    images = list(generate(stages, jobs, settings, on_step=lambda d, t: steps.append((d, t)),
                           on_batch=lambda batch: batches.append([j.prompt for j in batch])))
    assert [img.job.prompt for img in images] == ["a", "b", "c"]
    assert batches == [["a", "b"], ["c"]]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)] * 2
    assert images[0].pixels.shape == (16, 16, 3) and images[0].pixels.dtype == np.uint8


def test_img2img_sigmas_follow_the_originals(tiny_model):
    acp = tiny_model.alphas_cumprod
    table = schedules.sigmas_from_alphas_cumprod(acp).to(torch.float32)
    ddim = sampler_sigmas("ddim", acp, 10)
    start, run = img2img_sigmas("ddim", ddim, 0.5, 10)
    # CV img2img: t_enc = 5 -> noise at t=501, denoise 401, 301, 201, 101, 1 (its off-by-one kept)
    assert torch.isclose(start, table[501]) and torch.allclose(run[:-1], table[[401, 301, 201, 101, 1]])
    start, run = img2img_sigmas("ddim", ddim, 1.0, 10)  # the original fails here; sdgen runs the full grid
    assert torch.equal(run, ddim) and start == ddim[0]
    euler = sampler_sigmas("euler", acp, 10)
    start, run = img2img_sigmas("sgm", euler, 0.5, 10)  # SGM: keep int(0.5 * 11) = 5 lowest entries
    assert torch.equal(run, euler[-5:]) and start == euler[-5]
    with pytest.raises(SdgenError, match="leaves no denoising step"):
        img2img_sigmas("ddim", ddim, 0.05, 10)


def test_img2img_depends_on_the_init_image(tiny_model):
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (20, 26, 3), dtype=np.uint8)) for _ in range(2)]
    tensors = [image_to_tensor(img, None, 4) for img in images]
    assert tensors[0].shape == (3, 20, 24) and -1.0 <= float(tensors[0].min()) and float(tensors[0].max()) <= 1.0
    outs = [pixels(tiny_model, init_image=t, strength=0.5) for t in tensors]
    assert outs[0][0].shape == (20, 24, 3)
    assert not np.array_equal(outs[0][0], outs[1][0])
    assert np.array_equal(outs[0][0], pixels(tiny_model, init_image=tensors[0], strength=0.5)[0])


def test_bf16_autocast_only_when_asked(tiny_model):
    cpu = torch.device("cpu")
    with precision_context("autocast", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with precision_context("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(SdgenError):
        precision_context("fp8", cpu)
    assert pixels(tiny_model, precision="bf16", steps=2)[0].shape == (16, 16, 3)


def test_resolve_checkpoint(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SdgenError, match=r"models/ldm/stable-diffusion-v1/model\.ckpt.*--ckpt") as info:
        model_files.resolve_checkpoint(None, "configs/tests/sd1-tiny.yaml")
    assert "\n" not in str(info.value)
    # a relative config path falls back to the bundled files, as the originals ran from the repo root
    files = model_files.resolve_checkpoint(str(tiny_checkpoint), "configs/tests/sd1-tiny.yaml")
    assert files.config.is_file() and files.checkpoint == tiny_checkpoint.resolve()
    with pytest.raises(SdgenError, match="config not found"):
        model_files.resolve_checkpoint(str(tiny_checkpoint), "nope.yaml")


def test_config_geometry(tiny_config):
    from ldm.checkpoint import load_config

    config = load_config(tiny_config)
    assert model_files.vae_downsampling_factor(config) == 2
    assert model_files.unet_size_multiple(config) == 2
    assert model_files.unet_in_channels(config) == 4
    assert model_files.latent_size_multiple(config) == 4
    assert model_files.model_kind(config) == "sd"


def test_config_geometry_reads_the_sdxl_network_config():
    """SDXL configs name the UNet ``network_config``; the released base needs sides in multiples of 32."""
    from ldm.checkpoint import load_config

    config = load_config("configs/sdxl/sd_xl_base.yaml")
    assert model_files.unet_in_channels(config) == 4 and model_files.unet_size_multiple(config) == 4
    assert model_files.latent_size_multiple(config) == 32
    assert model_files.model_kind(config) == "sdxl"
    assert model_files.model_kind(load_config("configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml")) == "unclip"
    # the schedule read from the YAML is the one the loaded model has
    acp = model_files.config_alphas_cumprod(config)
    assert acp.shape == (1000,) and abs(float(acp[-1]) - 0.0046601) < 1e-6


def test_unset_flags_take_the_family_or_config_defaults():
    """The defaults table: the original scripts (SD), the SGM demo (SDXL), a config's ``sampling_defaults`` (the
    bundled demo model) over both."""
    from ldm.checkpoint import load_config

    sd1 = load_config("configs/tests/sd1-tiny.yaml")
    demo = load_config(model_files.DEMO_CONFIG)
    sdxl = load_config("configs/sdxl/sd_xl_base.yaml")

    def resolved(command, config, family="sd"):
        d = defaults_for(command, family, config)
        return d["sampler"], d["steps"], d["scale"], d.get("height"), d.get("width"), d["n_iter"]

    assert resolved("txt2img", sd1) == ("ddim", 50, 7.5, 512, 512, 2)
    assert resolved("safe-txt2img", sd1) == ("ddim", 50, 7.5, 512, 512, 2)
    assert resolved("img2img", sd1) == ("ddim", 50, 5.0, None, None, 1)
    assert resolved("txt2img", demo) == ("dpmpp_2m", 25, 4.0, 64, 64, 1)
    assert resolved("safe-txt2img", demo) == ("dpmpp_2m", 25, 4.0, 64, 64, 1)
    assert resolved("txt2img", sdxl, "sdxl") == ("euler", 50, 5.0, 1024, 1024, 2)
    assert resolved("unclip-variate", sd1, "unclip") == ("ddim", 20, 10.0, 768, 768, 2)
    assert resolved("txt2img", sd1, "unclip") == ("ddim", 20, 10.0, 768, 768, 2)  # the Karlo prior's decoder
    assert resolved("sdxl-refine", sdxl, "sdxl") == ("euler", 50, 5.0, 1024, 1024, 1)
