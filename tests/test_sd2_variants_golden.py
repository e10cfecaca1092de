"""SD 2 inpainting, depth-to-image and the x4 upscaler against the original code (golden cases 8-10).

The reference yamls instantiate directly (``ldm.models.diffusion.ddpm.LatentInpaintDiffusion`` ... resolve to
sdgen's classes). Where the original's randomness cannot be reproduced per image (its numpy start code, the
upscaler's ``randn_like`` of a permuted tensor, global-generator posterior samples), the recorded noise is the
input. Sampling goes through the path every command uses: the model's denoiser -> CFG -> ``sample("ddim")``,
with the conditioning built by sdgen (the concatenated inputs in both branches).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.concat_models import (
    LatentDepth2ImageDiffusion,
    LatentInpaintDiffusion,
    LatentUpscaleDiffusion,
    binarize_mask,
)
from ldm.sampling.grids import sampler_sigmas
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling import schedules
from ldm.util import instantiate_from_config
from tests.golden import case_config, case_data, case_state_dict, sample
from tests.tolerance import IEEE_EXACT, NETWORK_FLOAT32, Tolerance, assert_matches_recorded

# the golden README: 2 threads vs 1 differ by up to 8e-7 relative on UNet, sampler and VAE outputs; 10 steps on
# another CPU's kernels stay within 1e-5 relative (as the other golden sampler cases)
SAMPLER = Tolerance(why="10 float32 DDIM steps of a tiny UNet on another CPU's kernels", rel=1e-5, abs=1e-5)
SCALE = 5.0


def build(case: str):
    """The case's reference yaml with its tiny OpenCLIP sizes, built and loaded strictly."""
    cfg = case_config(case)
    cfg.model.params.cond_stage_config.params.model_cfg = cfg.golden_tiny_encoder_sizes.openclip_overrides["ViT-H-14"]
    model = instantiate_from_config(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)))
    model.load_state_dict(case_state_dict(case), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def inpaint() -> LatentInpaintDiffusion:
    return build("sd2-inpaint")


@pytest.fixture(scope="module")
def depth() -> LatentDepth2ImageDiffusion:
    return build("sd2-depth")


@pytest.fixture(scope="module")
def upscaler() -> LatentUpscaleDiffusion:
    return build("x4-upscaler")


def ddim(model, cond: dict, uncond: dict, x_T: torch.Tensor, steps: int = 10, sigmas=None, **options):
    """The command path: model.make_denoiser("ddim") -> CFG (scale 5, unconditional first) -> sample("ddim")."""
    sigmas = sampler_sigmas("ddim", model.alphas_cumprod, steps) if sigmas is None else sigmas
    guider = CFGDenoiser(model.make_denoiser("ddim"), SCALE)
    with torch.no_grad():
        return sample("ddim", guider, x_T, sigmas, extra_args={"cond": {"cond": cond, "uncond": uncond}}, **options)


# ---- 8. inpainting -------------------------------------------------------------------------------------------


def test_inpaint_mask_and_masked_image(inpaint):
    d = case_data("sd2-inpaint")
    mask = binarize_mask(d["in.mask_u8"].float()[None, None] / 255.0)
    assert_matches_recorded(mask, d["batch.mask"], IEEE_EXACT)  # 127 keeps, 128 repaints
    image = d["in.image_u8"].float().permute(2, 0, 1)[None] / 127.5 - 1.0
    assert_matches_recorded(image, d["batch.image"], IEEE_EXACT)
    assert_matches_recorded(image * (mask < 0.5), d["batch.masked_image"], IEEE_EXACT)


def test_inpaint_concat_conditioning(inpaint):
    """sdgen's concat input: the nearest-resized mask, and the masked image's posterior sampled per image."""
    d = case_data("sd2-inpaint")
    image = torch.cat([d["batch.image"][0], d["batch.mask"][0]])  # a job's input: RGB + mask
    seeds = [7, 8]
    with torch.no_grad():
        out = inpaint.concat_inputs(image, seeds, (16, 16), {})["concat"]
        posterior = inpaint.encode_first_stage(d["batch.masked_image"])
    assert out.shape == (2, 5, 16, 16)
    assert_matches_recorded(out[:1, :1], d["cond.mask_latent"], IEEE_EXACT)
    assert_matches_recorded(posterior.mean, d["masked_image.posterior_mean"], NETWORK_FLOAT32)
    assert_matches_recorded(posterior.std, d["masked_image.posterior_std"], NETWORK_FLOAT32)
    # with the original's recorded noise: its sampled latent
    golden = 0.18215 * (posterior.mean + posterior.std * d["masked_image.vae_noise"])
    assert_matches_recorded(golden, d["masked_image.latent"], NETWORK_FLOAT32)
    # each image's sample comes from its own generator (the conditioner passes input_noise_seed of the job's seed)
    for row, seed in enumerate(seeds):
        eps = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(out[row:row + 1, 1:], 0.18215 * (posterior.mean + posterior.std * eps), atol=1e-6)


def test_inpaint_unet_output(inpaint):
    d = case_data("sd2-inpaint")
    with torch.no_grad():
        out = inpaint.apply_model(d["unet.x"], d["unet.t"], {"crossattn": d["unet.context"],
                                                             "concat": d["unet.c_concat"]})
    assert_matches_recorded(out, d["unet.out"], NETWORK_FLOAT32)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_inpaint_ddim10(inpaint, eta):
    d = case_data("sd2-inpaint")
    c_concat = d["cond.c_concat"]
    cond, uncond = {"crossattn": d["c"], "concat": c_concat}, {"crossattn": d["uc"], "concat": c_concat}
    options, name = {}, "ddim10"
    if eta:
        steps = iter(d["ddim10_eta1.noise"])
        options, name = {"eta": eta, "noise_sampler": lambda sigma, sigma_next: next(steps)}, "ddim10_eta1"
    out = ddim(inpaint, cond, uncond, d["start_code.seed1234"], **options)
    assert_matches_recorded(out, d[f"{name}.out"], SAMPLER)
    with torch.no_grad():
        assert_matches_recorded(inpaint.decode_first_stage(d["vae.decode_in"]), d["vae.decode_out"], NETWORK_FLOAT32)


# ---- 9. depth-to-image ---------------------------------------------------------------------------------------


def test_depth_unet_output(depth):
    d = case_data("sd2-depth")
    with torch.no_grad():
        out = depth.apply_model(d["unet.x"], d["unet.t"], {"crossattn": d["unet.context"], "concat": d["unet.c_concat"]})
    assert_matches_recorded(out, d["unet.out"], NETWORK_FLOAT32)


def test_depth_concat_from_a_given_depth_map(depth):
    """A job's input may carry its raw depth as a 4th channel (``--depth-map``): the script's conditioning."""
    d = case_data("sd2-depth")
    raw = torch.nn.functional.interpolate(d["depth.raw"], size=(32, 32), mode="nearest")
    image = torch.cat([d["depth.image"][0], raw[0]])
    with torch.no_grad():
        got = depth.concat_inputs(image, [1, 2], (16, 16), {})["concat"]
    assert got.shape == (2, 1, 16, 16) and torch.equal(got[0], got[1])
    assert float(got.min()) == -1.0 and float(got.max()) == 1.0


@pytest.mark.parametrize("strength", [0.9, 1.0])
def test_depth_img2img(depth, strength):
    """The depth2img script's img2img: noised at grid point t_enc, first step one grid point below."""
    d = case_data("sd2-depth")
    cond_concat = d["depth.cond_script"]
    cond, uncond = {"crossattn": d["c"], "concat": cond_concat}, {"crossattn": d["uc"], "concat": cond_concat}
    sigmas = sampler_sigmas("ddim", depth.alphas_cumprod, 10)
    start, run = schedules.compvis_img2img_sigmas(sigmas, 0.9, 10)  # t_enc = min(int(s * 10), 9) = 9 for both
    if strength < 1.0:
        z_enc = schedules.compvis_stochastic_encode(d["depth.z0"], d["img2img.noise"], start)
        assert_matches_recorded(z_enc, d["img2img.z_enc"], NETWORK_FLOAT32)
        name = "img2img"
    else:
        z_enc, name = d["full.z_enc"], "full"  # do_full_sample: pure noise, still t_enc = steps - 1
    assert int(d[f"{name}.t_enc"]) == 9
    out = ddim(depth, cond, uncond, z_enc, sigmas=run)
    assert_matches_recorded(out, d[f"{name}.out"], SAMPLER)


# ---- 10. x4 upscaler -----------------------------------------------------------------------------------------


def test_upscaler_schedules(upscaler):
    d = case_data("x4-upscaler")
    assert upscaler.parameterization == "v" and upscaler.scale_factor == 0.08333
    assert_matches_recorded(upscaler.alphas_cumprod, d["alphas_cumprod"], IEEE_EXACT)
    assert_matches_recorded(upscaler.low_scale_model.alphas_cumprod, d["low_scale.alphas_cumprod"], IEEE_EXACT)
    assert upscaler.max_noise_level == 350


@pytest.mark.parametrize("level", [0, 20, 100, 349])
def test_upscaler_noise_augmentation(upscaler, level):
    d = case_data("x4-upscaler")
    lr = d["in.lr_u8"].float().permute(2, 0, 1)[None] / 127.5 - 1.0
    assert_matches_recorded(lr, d["lr"], IEEE_EXACT)
    x, levels = upscaler.low_scale_model(lr, level, noise=d["noise_aug.noise"])
    assert levels.tolist() == [level]
    assert_matches_recorded(x, d[f"noise_aug.level{level}.out"], Tolerance(why="two float32 products", rel=1e-6, abs=1e-6))


def test_upscaler_refuses_levels_past_its_maximum(upscaler):
    from ldm.errors import SdgenError

    with pytest.raises(SdgenError, match="0..349"):
        upscaler.low_scale_model(torch.zeros(1, 3, 8, 8), 350, noise=torch.zeros(1, 3, 8, 8))


def test_upscaler_unet_output_with_integer_labels(upscaler):
    d = case_data("x4-upscaler")
    cond = {"crossattn": d["unet.context"], "concat": d["unet.c_concat"], "vector": d["unet.y"]}
    with torch.no_grad():
        out = upscaler.apply_model(d["unet.x"], d["unet.t"], cond)
        level0 = upscaler.apply_model(d["unet.x"], d["unet.t"], {**cond, "vector": torch.zeros_like(d["unet.y"])})
    assert d["unet.y"].dtype == torch.int64
    assert_matches_recorded(out, d["unet.out"], NETWORK_FLOAT32)
    assert_matches_recorded(level0, d["unet.out_level0"], NETWORK_FLOAT32)


def test_upscaler_ddim10_and_decode(upscaler):
    d = case_data("x4-upscaler")
    lr20 = d["noise_aug.level20.out"]
    y = torch.tensor([20])
    cond = {"crossattn": d["c"], "concat": lr20, "vector": y}
    uncond = {"crossattn": d["uc"], "concat": lr20, "vector": y}
    out = ddim(upscaler, cond, uncond, d["start_code.seed1234"])
    assert_matches_recorded(out, d["ddim10.out"], SAMPLER)
    with torch.no_grad():
        image = upscaler.decode_first_stage(d["vae.decode_in"])
    assert image.shape == (1, 3, 64, 64)  # the f = 4 VAE: four times the latent
    assert_matches_recorded(image, d["vae.decode_out"], NETWORK_FLOAT32)


def test_upscaler_concat_inputs_per_image(upscaler):
    """sdgen's conditioning: each image's own augmentation noise, the level as an int64 label for every image."""
    d = case_data("x4-upscaler")
    got = upscaler.concat_inputs(d["lr"][0], [3, 4], (16, 16), {}, noise_level=20)
    assert got["vector"].tolist() == [20, 20] and got["vector"].dtype == torch.int64
    for row, seed in enumerate((3, 4)):
        n = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(seed))
        x, _ = upscaler.low_scale_model(d["lr"], 20, noise=n[None])
        assert torch.equal(got["concat"][row:row + 1], x)


def test_sd15_inpainting_config_is_sd1_with_a_9_channel_input() -> None:
    """configs/stable-diffusion/v1-inpainting-inference.yaml: the SD 1.x keys, the first convolution 9 channels wide
    (runwayml's sd-v1-5-inpainting.ckpt layout)."""
    from ldm.checkpoint import build_model_on_meta
    from ldm.model_files import bundled_config
    from tests.golden import released_manifest

    model = build_model_on_meta(bundled_config("configs/stable-diffusion/v1-inpainting-inference.yaml"))
    assert isinstance(model, LatentInpaintDiffusion)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = {k: list(v) for k, v in released_manifest("sd-v1-4")["keys"].items()}
    ref["model.diffusion_model.input_blocks.0.0.weight"] = [320, 9, 3, 3]
    ref.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")  # transformers < 4.31 only
    assert ours == ref
