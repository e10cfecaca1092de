"""SDXL: released-file layout, conditioning layout, the base -> refiner hand-over, SDEdit, seeds, NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoint import build_model_on_meta
from ldm.errors import SdgenError
from ldm.defaults import FAMILY_DEFAULTS
from ldm.generation.generate import generate
from ldm.generation.request import Settings, make_jobs
from ldm.generation.stages import build_stages
from ldm.models.diffusion.engine import DiffusionEngine, MicroConditioning
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.sampling.grids import grid_timesteps, handover_cutoff, sdedit_sigmas, split_sigmas
from ldm.sampling.schedules import LegacyDDPMDiscretization
from tests.golden import released_manifest
from tests.sdxl_tiny import SIZE, tiny_engine

CLIP_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
TABLE = LegacyDDPMDiscretization()(1000, do_append_zero=False, flip=True)


@pytest.fixture(scope="module")
def base() -> DiffusionEngine:
    return tiny_engine("base")


@pytest.fixture(scope="module")
def refiner() -> DiffusionEngine:
    return tiny_engine("refiner")


def settings(**kw) -> Settings:
    return Settings(**{**dict(sampler="euler", steps=6, grid="sgm", scale=5.0, height=SIZE, width=SIZE, factor=2),
                       **kw})


def run(values: Settings, models, n: int = 1, seed: int = 42, init=None) -> list[np.ndarray]:
    """Generate ``n`` images with ``models`` (``[(role, model)]``) through the stages and the one loop."""
    stages, start = build_stages(models, values)
    jobs = make_jobs([["a lighthouse at dusk"] * n], 1, seed, init_images=[0 if init is not None else None])
    return [img.pixels for img in generate(stages, jobs, values, start_sigma=start,
                                           init_images=[init] if init is not None else ())]


# ----------------------------------------------------------------------------- released layout (meta device)


@pytest.fixture(scope="module")
def full_size():
    return {
        "sd_xl_base_0.9": build_model_on_meta("configs/sdxl/sd_xl_base.yaml"),
        "sd_xl_refiner_0.9": build_model_on_meta("configs/sdxl/sd_xl_refiner.yaml"),
    }


@pytest.mark.parametrize("name", ["sd_xl_base_0.9", "sd_xl_refiner_0.9"])
def test_full_size_models_have_the_released_keys_and_shapes(full_size, name):
    model = full_size[name]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    released = released_manifest(name)["keys"]
    # transformers >= 4.31 no longer saves CLIP's position_ids (arange(77)); the loader drops the file's copy
    expected = {k: v for k, v in released.items() if k != CLIP_POSITION_IDS}
    assert ours == expected
    if name == "sd_xl_base_0.9":
        assert CLIP_POSITION_IDS in released
    assert model.denoiser.sigmas.device.type == "cpu"  # the one buffer the files may lack is computed for real
    torch.testing.assert_close(model.denoiser.sigmas, TABLE, rtol=0, atol=0)
    assert model.scale_factor == 0.13025


@pytest.mark.parametrize(
    "name, text_widths, pooled, numbers, adm",
    [("sd_xl_base_0.9", (768, 1280), 1280, 6, 2816), ("sd_xl_refiner_0.9", (1280,), 1280, 5, 2560)],
)
def test_full_size_conditioning_widths_feed_the_unet(full_size, name, text_widths, pooled, numbers, adm):
    model = full_size[name]
    state = model.state_dict()
    prefix = "model.diffusion_model."
    assert state[prefix + "label_emb.0.0.weight"].shape[1] == adm == pooled + 256 * numbers
    context_dims = {v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")}
    assert context_dims == {sum(text_widths)}
    proj = [v for k, v in state.items() if k.endswith("model.text_projection")]
    assert [p.shape[1] for p in proj] == [pooled]
    assert model.force_uc_zero_embeddings == (["txt"] if name == "sd_xl_base_0.9" else [])
    assert model.is_refiner == (name == "sd_xl_refiner_0.9")


def test_documented_sampling_defaults():
    sgm = {"sampler": "euler", "grid": "sgm", "steps": 50, "scale": 5.0, "height": 1024, "width": 1024,
           "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
    assert {k: FAMILY_DEFAULTS["txt2img"]["sdxl"][k] for k in sgm} == sgm


# ----------------------------------------------------------------------------- conditioning layout


def fourier(values) -> torch.Tensor:
    return torch.cat([timestep_embedding(torch.tensor([float(v)]), 256) for v in values], dim=1)


def test_base_adm_vector_and_context_layout(base):
    micro = MicroConditioning(original_size=(512, 384), crop_coords=(8, 16), target_size=(32, 24))
    prompts = ["a lighthouse at dusk", "a red cat"]
    cond, uncond = base.get_cond_uncond(prompts, ["", ""], micro)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 1552)
    clip, openclip = base.conditioner.embedders[0], base.conditioner.embedders[1]
    tokens, pooled = openclip(prompts)
    torch.testing.assert_close(cond["crossattn"][..., :32], clip(prompts))
    torch.testing.assert_close(cond["crossattn"][..., 32:], tokens)
    torch.testing.assert_close(cond["vector"][:, :16], pooled)
    sizes = torch.cat([fourier((512, 384)), fourier((8, 16)), fourier((32, 24))], dim=1)
    torch.testing.assert_close(cond["vector"][:, 16:], sizes.expand(2, -1), rtol=0, atol=0)
    # unconditional branch of the base: zero text context and zero pooled vector, same sizes
    assert torch.count_nonzero(uncond["crossattn"]) == 0
    assert torch.count_nonzero(uncond["vector"][:, :16]) == 0
    torch.testing.assert_close(uncond["vector"][:, 16:], cond["vector"][:, 16:], rtol=0, atol=0)


def test_base_encodes_a_non_empty_negative_prompt(base):
    micro = MicroConditioning.for_image(SIZE, SIZE)
    _, uncond = base.get_cond_uncond(["a cat"], ["blurry"], micro)
    expected, _ = base.get_cond_uncond(["blurry"], [""], micro)
    torch.testing.assert_close(uncond["crossattn"], expected["crossattn"])
    torch.testing.assert_close(uncond["vector"], expected["vector"])


def test_refiner_adm_vector_with_aesthetic_scores(refiner):
    micro = MicroConditioning.for_image(96, 64, crop_coords=(4, 2), aesthetic_score=7.0, negative_aesthetic_score=1.5)
    cond, uncond = refiner.get_cond_uncond(["a lighthouse"], ["fog"], micro)
    assert cond["crossattn"].shape == (1, 77, 32) and cond["vector"].shape == (1, 1296)
    size_crop = torch.cat([fourier((96, 64)), fourier((4, 2))], dim=1)
    torch.testing.assert_close(cond["vector"][:, 16:], torch.cat([size_crop, fourier([7.0])], 1), rtol=0, atol=0)
    torch.testing.assert_close(uncond["vector"][:, 16:], torch.cat([size_crop, fourier([1.5])], 1), rtol=0, atol=0)
    tokens, pooled = refiner.conditioner.embedders[0](["fog"])
    torch.testing.assert_close(uncond["crossattn"], tokens)
    torch.testing.assert_close(uncond["vector"][:, :16], pooled)


def test_each_encoder_tokenizes_as_its_original(base):
    clip, openclip = base.conditioner.embedders[0], base.conditioner.embedders[1]
    a, b = clip.tokenize(["a cat"])[0], openclip.tokenize(["a cat"])[0]
    assert a[0] == b[0] == 49406 and int((a == 49407).nonzero()[0]) == int((b == 49407).nonzero()[0])
    eot = int((b == 49407).nonzero()[0])
    assert torch.all(a[eot:] == 49407)  # HF CLIPTokenizer pads with <|endoftext|>
    assert torch.all(b[eot + 1:] == 0)  # open_clip pads with 0


def test_micro_conditioning_defaults_follow_the_image():
    micro = MicroConditioning.for_image(768, 1344)
    assert micro.original_size == micro.target_size == (768, 1344)
    assert micro.crop_coords == (0, 0) and (micro.aesthetic_score, micro.negative_aesthetic_score) == (6.0, 2.5)


# ----------------------------------------------------------------------------- grids, hand-over, SDEdit


@pytest.mark.parametrize("grid, first_base, handover", [("sgm", 999, 199), ("sgm_legacy", 981, 181)])
def test_handover_sigma_of_the_two_stage_split(grid, first_base, handover):
    sigmas = LegacyDDPMDiscretization(legacy_range=grid == "sgm_legacy")(50)
    base_sigmas, refiner_sigmas = split_sigmas(sigmas, TABLE, 0.8)
    assert handover_cutoff(0.8) == 200
    assert (len(base_sigmas) - 1, len(refiner_sigmas) - 1) == (40, 10)
    assert base_sigmas[-1] == refiner_sigmas[0] == TABLE[handover]
    assert torch.equal(torch.cat([base_sigmas[:-1], refiner_sigmas]), sigmas)
    t_base = grid_timesteps(base_sigmas[:-1], TABLE)
    t_refiner = grid_timesteps(refiner_sigmas, TABLE)
    assert int(t_base[0]) == first_base and bool((t_base >= 200).all()) and bool((t_refiner < 200).all())
    assert refiner_sigmas[-1] == 0


def test_diffusers_model_card_split_of_40_steps():
    # 40 steps, high_noise_frac 0.8 on the 0.9 (leading) grid: base 976 ... 201, refiner 176 ... 1 (facts.md 4.7)
    sigmas = LegacyDDPMDiscretization(legacy_range=True)(40)
    base_sigmas, refiner_sigmas = split_sigmas(sigmas, TABLE, 0.8)
    assert (len(base_sigmas) - 1, len(refiner_sigmas) - 1) == (32, 8)
    assert grid_timesteps(refiner_sigmas, TABLE).tolist() == [176, 151, 126, 101, 76, 51, 26, 1]


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.2, 1.5])
def test_high_noise_frac_outside_the_open_interval_is_refused(frac):
    with pytest.raises(SdgenError, match="strictly between 0 and 1"):
        split_sigmas(LegacyDDPMDiscretization()(50), TABLE, frac)


@pytest.mark.parametrize("legacy, frac, who", [(True, 0.05, "base"), (False, 0.95, "refiner")])
def test_a_split_without_steps_for_one_model_is_refused(legacy, frac, who):
    # 10 steps: t = 901 ... 1 (0.9 grid), hand-over at t = 950: nothing for the base;
    # t = 999 ... 99 ("sgm"), hand-over at t = 50: nothing for the refiner
    with pytest.raises(SdgenError, match=f"leaves the {who} no step"):
        split_sigmas(LegacyDDPMDiscretization(legacy_range=legacy)(10), TABLE, frac)


@pytest.mark.parametrize("grid, start_t", [("sgm", 279), ("sgm_legacy", 261)])
def test_sdedit_start_step(grid, start_t):
    sigmas = LegacyDDPMDiscretization(legacy_range=grid == "sgm_legacy")(50)
    run_sigmas = sdedit_sigmas(sigmas, 0.3)
    assert len(run_sigmas) - 1 == 14  # int(0.3 * 51) = 15 lowest entries, the last being 0
    assert int(grid_timesteps(run_sigmas[:1], TABLE)) == start_t
    assert torch.equal(run_sigmas, sigmas[-15:])
    with pytest.raises(SdgenError, match="no denoising step"):
        sdedit_sigmas(sigmas, 0.01)


def test_hand_over_continues_exactly_where_the_base_stopped(base):
    # a refiner that is the base itself: base -> "refiner" must equal the base alone, step for step
    alone = run(settings(), [("base", base)])
    split = run(settings(high_noise_frac=0.5), [("base", base), ("refiner", base)])
    stages, _ = build_stages([("base", base), ("refiner", base)], settings(high_noise_frac=0.5))
    assert [s.steps for s in stages] == [3, 3] and stages[0].sigmas[-1] == stages[1].sigmas[0]
    np.testing.assert_array_equal(alone[0], split[0])


def test_two_stage_run_calls_each_model_on_its_own_sigmas(base, refiner):
    calls: dict[str, list[float]] = {"base": [], "refiner": []}
    for name, model in (("base", base), ("refiner", refiner)):
        original = model.apply_model

        def spy(x, t, cond, name=name, original=original):
            calls[name].extend(int(v) for v in t[:1])
            return original(x, t, cond)

        model.apply_model = spy
    try:
        run(settings(high_noise_frac=0.5), [("base", base), ("refiner", refiner)])
    finally:
        del base.apply_model, refiner.apply_model
    assert calls == {"base": [999, 832, 666], "refiner": [499, 333, 166]}


def test_sdedit_run_starts_at_the_pruned_sigma_and_keeps_the_image(refiner):
    init = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    stages, start = build_stages([("refiner", refiner)], settings(steps=10, strength=0.3))
    # int(0.3 * 11) = 3 lowest of [0, sigma(99), sigma(199), ...]: 2 steps from t = 199
    assert stages[0].steps == 2 and int(grid_timesteps(stages[0].sigmas[:1], TABLE)) == 199
    assert start == stages[0].sigmas[0]
    low = run(settings(steps=10, strength=0.2), [("refiner", refiner)], init=init)[0]
    high = run(settings(steps=10, strength=1.0), [("refiner", refiner)], init=init)[0]
    # a random VAE does not reconstruct the image, but less noise must stay closer to the plain decode
    decoded = refiner.decode_first_stage(refiner.encode(init[None], torch.Generator().manual_seed(0)))
    ref = (decoded[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) * 127.5
    assert np.abs(low - ref).mean() < np.abs(high - ref).mean()


# ----------------------------------------------------------------------------- seeds


def test_determinism_per_seed(base, refiner):
    two = [("base", base), ("refiner", refiner)]
    pair = run(settings(high_noise_frac=0.5), two, n=2, seed=7)
    again = run(settings(high_noise_frac=0.5), two, n=2, seed=7)
    second_alone = run(settings(high_noise_frac=0.5), two, seed=8)
    for a, b in zip(pair, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pair[1], second_alone[0])  # image i of a batch = seed + i on its own
    assert not np.array_equal(pair[0], pair[1])


def test_churn_noise_comes_from_the_image_seed(base):
    a = run(settings(s_churn=2.0), [("base", base)], seed=3)[0]
    b = run(settings(s_churn=2.0), [("base", base)], seed=3)[0]
    c = run(settings(), [("base", base)], seed=3)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------- precision and NaN


def test_nan_latents_are_reported_not_decoded_to_black(base):
    z = torch.zeros(1, 4, 16, 16)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(SdgenError, match="NaN/inf.*--precision full"):
        base.decode_first_stage(z)


def test_vae_runs_in_float32_even_when_loaded_in_half(base):
    model = tiny_engine("base").half()
    assert model.first_stage_model.decoder.conv_in.weight.dtype == torch.float16
    image = model.decode_first_stage(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert model.first_stage_model.decoder.conv_in.weight.dtype == torch.float32
    assert image.dtype == torch.float32 and bool(torch.isfinite(image).all())
    expected = base.decode_first_stage(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(image, expected, rtol=1e-2, atol=1e-2)


def test_float16_load_keeps_the_sigma_table_in_float32():
    from ldm.checkpoint import assign_state_dict, load_config
    from tests.sdxl_tiny import TINY_CONFIGS, tiny_state_dict

    model = build_model_on_meta(load_config(TINY_CONFIGS["base"]))
    model = assign_state_dict(model, dict(tiny_state_dict("base")), dtype=torch.float16)
    assert model.dtype == torch.float16 and model.denoiser.sigmas.dtype == torch.float32
    torch.testing.assert_close(model.denoiser.sigmas, TABLE, rtol=0, atol=0)


def test_vae_runs_outside_autocast(base):
    g = torch.Generator().manual_seed(1)
    z, image = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    plain_decode, plain_mean = base.decode_first_stage(z), base.encode_first_stage(image).mean
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded, mean = base.decode_first_stage(z), base.encode_first_stage(image).mean
        assert base.first_stage_model.decoder.conv_in(z).dtype == torch.bfloat16  # autocast is really on
    assert decoded.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(decoded, plain_decode, rtol=0, atol=0)
    torch.testing.assert_close(mean, plain_mean, rtol=0, atol=0)


def test_reduced_precision_run_gives_finite_images(base, refiner):
    two = [("base", base), ("refiner", refiner)]
    images = run(settings(precision="bf16", high_noise_frac=0.5), two)
    full = run(settings(high_noise_frac=0.5), two)
    assert images[0].std() > 0 and np.abs(images[0].astype(int) - full[0].astype(int)).mean() < 20


def test_overflowing_decoder_output_is_reported(base, monkeypatch):
    monkeypatch.setattr(base.first_stage_model, "decode", lambda z: torch.full((1, 3, 32, 32), float("inf")))
    with pytest.raises(SdgenError, match="decoded images contain NaN/inf"):
        base.decode_first_stage(torch.zeros(1, 4, 16, 16))


# ----------------------------------------------------------------------------- planning errors


def test_stages_refuse_inconsistent_model_combinations(base, refiner):
    with pytest.raises(SdgenError, match="takes two models, --high-noise-frac"):
        build_stages([("base", base), ("refiner", refiner)], settings())
    with pytest.raises(SdgenError, match="takes two models, --high-noise-frac and no init image"):
        build_stages([("base", base), ("refiner", refiner)], settings(high_noise_frac=0.5, strength=0.3))
    with pytest.raises(SdgenError, match="unknown sigma grid"):
        build_stages([("base", base)], settings(grid="nope"))
