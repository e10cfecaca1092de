"""The generation library (ldm.pipelines) on the tiny SD 1.x model, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import pipelines
from ldm.errors import SdgenError
from ldm.pipelines import GenerationRequest, generate, img2img_sigmas, prompt_batches
from ldm.sampling import schedules
from ldm.sampling.samplers import sampler_sigmas


def tiny_request(**kw) -> GenerationRequest:
    defaults = dict(batches=[["a red cube"]], n_iter=1, steps=4, height=16, width=16, factor=2, scale=5.0)
    defaults.update(kw)
    return GenerationRequest(**defaults)


def pixels(model, request, **kw) -> list[np.ndarray]:
    return [image.pixels for image in generate(model, request, **kw)]


def test_jobs_give_each_image_its_seed_and_prompt():
    request = tiny_request(batches=prompt_batches(["p"], 3, per_image=False), n_iter=2, seed=10)
    jobs = request.jobs()
    assert [[j.seed for j in b] for b in jobs] == [[10, 11, 12], [13, 14, 15]]
    assert [j.index for b in jobs for j in b] == list(range(6)) and request.num_images == 6
    request.fixed_code = True
    assert [[j.seed for j in b] for b in request.jobs()] == [[10, 11, 12], [10, 11, 12]]

    from_file = tiny_request(batches=prompt_batches(["a", "b", "c"], 2, per_image=True), n_iter=2)
    assert [[(j.prompt, j.seed, j.position) for j in b] for b in from_file.jobs()] == [
        [("a", 42, 0), ("b", 43, 1)], [("c", 44, 0)], [("a", 45, 0), ("b", 46, 1)], [("c", 47, 0)]
    ]
    with pytest.raises(SdgenError):
        prompt_batches([], 2, per_image=True)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_image_regenerates_alone_with_its_seed(tiny_model, sampler):
    """Image 2 of a batch of 3 (seed 42 + 2) equals a run of seed 44 alone; ancestral noise is per image too."""
    batch = pixels(tiny_model, tiny_request(batches=[["a red cube"] * 3], sampler=sampler))
    alone = pixels(tiny_model, tiny_request(batches=[["a red cube"]], seed=44, sampler=sampler))
    diff = np.abs(batch[2].astype(int) - alone[0].astype(int))
    assert diff.max() <= 1, "batch position changed the image"  # float rounding of batched kernels at most
    assert np.abs(batch[0].astype(int) - batch[2].astype(int)).max() > 10, "different seeds gave the same image"


def test_prompt_negative_prompt_and_scale_reach_the_model(tiny_model):
    base = pixels(tiny_model, tiny_request())
    assert np.array_equal(base[0], pixels(tiny_model, tiny_request())[0]), "not deterministic"
    other_prompt = pixels(tiny_model, tiny_request(batches=[["a blue sphere"]]))
    assert not np.array_equal(base[0], other_prompt[0])
    negative = pixels(tiny_model, tiny_request(negative_prompt="blurry"))
    assert not np.array_equal(base[0], negative[0])
    # scale 1: no unconditional branch, so the negative prompt has no effect
    plain = pixels(tiny_model, tiny_request(scale=1.0))
    assert np.array_equal(plain[0], pixels(tiny_model, tiny_request(scale=1.0, negative_prompt="blurry"))[0])


def test_generate_reports_steps_and_batches(tiny_model):
    steps, batches = [], []
    request = tiny_request(batches=[["a", "b"], ["c"]], sampler="plms")
    images = list(generate(tiny_model, request, on_step=lambda d, t: steps.append((d, t)),
                           on_batch=lambda jobs: batches.append([j.prompt for j in jobs])))
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
    start, run = img2img_sigmas("euler", euler, 0.5, 10)  # SGM: keep int(0.5 * 11) = 5 lowest entries
    assert torch.equal(run, euler[-5:]) and start == euler[-5]


def test_img2img_depends_on_the_init_image(tiny_model):
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (20, 26, 3), dtype=np.uint8)) for _ in range(2)]
    tensors = [pipelines.image_to_tensor(img, None, 4) for img in images]
    assert tensors[0].shape == (3, 20, 24) and -1.0 <= float(tensors[0].min()) and float(tensors[0].max()) <= 1.0
    outs = [pixels(tiny_model, tiny_request(height=20, width=24, init_image=t, strength=0.5)) for t in tensors]
    assert outs[0][0].shape == (20, 24, 3)
    assert not np.array_equal(outs[0][0], outs[1][0])
    again = pixels(tiny_model, tiny_request(height=20, width=24, init_image=tensors[0], strength=0.5))
    assert np.array_equal(outs[0][0], again[0])


def test_bf16_autocast_only_when_asked(tiny_model):
    cpu = torch.device("cpu")
    with pipelines.precision_context("autocast", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with pipelines.precision_context("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(SdgenError):
        pipelines.precision_context("fp8", cpu)
    out = pixels(tiny_model, tiny_request(precision="bf16", steps=2))
    assert out[0].shape == (16, 16, 3)


def test_resolve_checkpoint(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SdgenError, match=r"models/ldm/stable-diffusion-v1/model\.ckpt.*--ckpt") as info:
        pipelines.resolve_checkpoint(None, "configs/tests/sd1-tiny.yaml")
    assert "\n" not in str(info.value)
    # a relative config path falls back to the sdgen source tree, as the originals ran from the repo root
    files = pipelines.resolve_checkpoint(str(tiny_checkpoint), "configs/tests/sd1-tiny.yaml")
    assert files.config.is_file() and files.checkpoint == tiny_checkpoint.resolve()
    with pytest.raises(SdgenError, match="config not found"):
        pipelines.resolve_checkpoint(str(tiny_checkpoint), "nope.yaml")


def test_config_geometry(tiny_config):
    from ldm.checkpoint import load_config

    config = load_config(tiny_config)
    assert pipelines.vae_downsampling_factor(config) == 2
    assert pipelines.unet_size_multiple(config) == 2
    assert pipelines.unet_in_channels(config) == 4
    assert pipelines.latent_size_multiple(config) == 4


def test_config_geometry_reads_the_sdxl_network_config():
    """SDXL configs name the UNet ``network_config``; the released base needs sides in multiples of 32."""
    from ldm.checkpoint import load_config
    from ldm.sdxl_pipeline import is_sdxl_config, sdxl_sampling_defaults

    config = load_config("configs/sdxl/sd_xl_base.yaml")
    assert pipelines.unet_in_channels(config) == 4 and pipelines.unet_size_multiple(config) == 4
    assert pipelines.latent_size_multiple(config) == 32
    assert is_sdxl_config(config) and not is_sdxl_config(load_config("configs/tests/sd1-tiny.yaml"))
    assert sdxl_sampling_defaults(config)["sampler"] == "euler"


def test_unset_flags_take_the_family_or_config_defaults():
    """txt2img / img2img / safe-txt2img leave sampling flags and --n_iter unset; they come from the original
    scripts (SD), the SGM demo (SDXL) or the config's ``sampling_defaults`` (the bundled demo model)."""
    from ldm.checkpoint import load_config
    from ldm.cli.options import GenerateOptions
    from ldm.cli.run import resolve_sampling_defaults

    sd1 = load_config("configs/tests/sd1-tiny.yaml")
    demo = load_config(pipelines.DEMO_CONFIG)
    sdxl = load_config("configs/sdxl/sd_xl_base.yaml")

    def resolved(command, config, is_sdxl=False, **given):
        opts = resolve_sampling_defaults(GenerateOptions(command=command, **given), config, is_sdxl)
        return opts.sampler, opts.steps, opts.scale, opts.height, opts.width, opts.n_iter

    assert resolved("txt2img", sd1) == ("ddim", 50, 7.5, 512, 512, 2)
    assert resolved("safe-txt2img", sd1) == ("ddim", 50, 7.5, 512, 512, 2)
    assert resolved("img2img", sd1) == ("ddim", 50, 5.0, None, None, 1)
    assert resolved("txt2img", demo) == ("dpmpp_2m", 25, 4.0, 64, 64, 1)
    assert resolved("safe-txt2img", demo) == ("dpmpp_2m", 25, 4.0, 64, 64, 1)
    assert resolved("txt2img", sdxl, True) == ("euler", 50, 5.0, 1024, 1024, 2)
    # a flag given on the command line wins over every default
    assert resolved("txt2img", demo, n_iter=3, steps=10, height=128) == ("dpmpp_2m", 10, 4.0, 128, 64, 3)
