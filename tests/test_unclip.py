"""Stable unCLIP on tiny random models (configs/tests/unclip-{l,h}-tiny.yaml), CPU only.

Covers shapes of the image -> embedding -> ADM route, the noise augmentation against its formulas written out
here (cosine schedule, q_sample in normalised space, sinusoidal level embedding), determinism per seed, the
Karlo statistics file, and the loader: strict keys, the image tower from a separate file, the unused CLIP
text-side leftovers, and clear errors for non-unCLIP configs and checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import build_model_on_meta, load_config
from ldm.errors import SdgenError
from ldm.models.diffusion.unclip import (
    ImageEmbeddingConditionedLatentDiffusion,
    load_unclip_model,
    missing_clip_stats_notice,
)
from tests.conftest import randomized_state_dict

REPO = Path(__file__).resolve().parent.parent
TINY = {v: REPO / "configs" / "tests" / f"unclip-{v}-tiny.yaml" for v in ("l", "h")}
SD2V_TINY = REPO / "configs" / "tests" / "sd2v-tiny.yaml"
D = 16  # tiny embedding width; ADM = 2 * D


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny unCLIP-L/-H and SD2-v checkpoints with seeded random weights (safetensors)."""
    folder = tmp_path_factory.mktemp("unclip-ckpts")
    out = {}
    for name, cfg in (("l", TINY["l"]), ("h", TINY["h"]), ("sd2v", SD2V_TINY)):
        sd = randomized_state_dict(build_model_on_meta(load_config(cfg)), seed=1)
        out[name] = folder / f"{name}.safetensors"
        save_file(sd, str(out[name]))
    return out


@pytest.fixture(scope="module")
def model_l(ckpts) -> ImageEmbeddingConditionedLatentDiffusion:
    return load_unclip_model(TINY["l"], ckpts["l"])


@pytest.fixture(scope="module")
def model_h(ckpts) -> ImageEmbeddingConditionedLatentDiffusion:
    return load_unclip_model(TINY["h"], ckpts["h"])


def _images(n: int = 2, h: int = 24, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- the formulas, written out ---------------------------------------------------------------------------------


def cosine_alphabar(level: int, steps: int = 1000) -> float:
    """alphabar of the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021 eq. 17, betas capped at 0.999)."""

    def f(t: float) -> float:
        return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    acp = 1.0
    for i in range(level + 1):
        acp *= 1.0 - min(1.0 - f(i + 1) / f(i), 0.999)
    return acp


def level_embedding(level: int, dim: int) -> torch.Tensor:
    """[cos(level * w_i) | sin(level * w_i)], w_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    w = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
    return torch.cat([torch.cos(level * w), torch.sin(level * w)])


# ---- shapes and routing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["l", "h"])
def test_shapes_through_the_adm_route(variant, model_l, model_h) -> None:
    model = model_l if variant == "l" else model_h
    images = _images(3)
    emb = model.embed_images(images)
    assert emb.shape == (3, D) and emb.dtype == torch.float32
    adm = model.image_conditioning(images, 100, generator=torch.Generator().manual_seed(0))
    assert adm.shape == (3, 2 * D)
    context = model.get_learned_conditioning(["a cat", "", "a dog"])
    assert context.shape == (3, 77, 32)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 1])
    with torch.no_grad():
        v = model.apply_model(x, t, {"crossattn": context, "vector": adm})
        v_uncond = model.apply_model(x, t, {"crossattn": context, "vector": model.unconditional_adm(adm)})
    assert v.shape == x.shape
    assert (v - v_uncond).abs().max() > 1e-4
    assert torch.equal(model.unconditional_adm(adm), torch.zeros(3, 2 * D))


def test_embedder_resizes_any_image_size(model_h) -> None:
    a = model_h.embed_images(_images(1, 64, 64))
    b = model_h.embed_images(torch.nn.functional.interpolate(_images(1, 64, 64), size=(48, 80), mode="bilinear"))
    assert a.shape == b.shape == (1, D)


# ---- noise augmentation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 100, 250, 999])
def test_noise_augmentation_equals_formulas(model_l, level) -> None:
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(D, generator=g) * 0.3
    std = torch.rand(D, generator=g) + 0.5
    model_l.set_clip_stats(mean, std, source="test")
    try:
        emb = torch.randn(2, D, generator=g)
        noise = torch.randn(2, D, generator=g)
        adm = model_l.augment_embedding(emb, level, noise=noise)
    finally:
        model_l.set_clip_stats(torch.zeros(D), torch.ones(D))
        model_l.clip_stats_source = None
    a = cosine_alphabar(level)
    e64, n64, m64, s64 = (t.double() for t in (emb, noise, mean, std))
    expected = (math.sqrt(a) * (e64 - m64) / s64 + math.sqrt(1 - a) * n64) * s64 + m64
    torch.testing.assert_close(adm[:, :D].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adm[:, D:].double(), level_embedding(level, D).expand(2, D), rtol=1e-5, atol=1e-5)


def test_level_zero_still_adds_a_little_noise(model_h) -> None:
    """As in the original, level 0 means sqrt(1 - alphabar[0]) ~ 0.0064 of noise, not none."""
    assert math.sqrt(1 - cosine_alphabar(0)) == pytest.approx(0.006425, rel=1e-3)
    emb = torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    a = model_h.augment_embedding(emb, 0, generator=torch.Generator().manual_seed(1))
    b = model_h.augment_embedding(emb, 0, generator=torch.Generator().manual_seed(2))
    assert 0 < (a - b).abs().max() < 0.1


def test_noise_augmentation_is_deterministic_per_seed(model_h) -> None:
    emb = model_h.embed_images(_images(2))

    def run(seed: int) -> torch.Tensor:
        return model_h.augment_embedding(emb, 300, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    assert torch.equal(model_h.embed_images(_images(2)), emb)


@pytest.mark.parametrize("level", [-1, 1000, 5000])
def test_noise_level_out_of_range_is_refused(model_h, level) -> None:
    with pytest.raises(SdgenError, match="noise level"):
        model_h.augment_embedding(torch.zeros(1, D), level)


# ---- Karlo statistics ---------------------------------------------------------------------------------------------


def test_clip_stats_file(tmp_path, ckpts) -> None:
    mean, std = torch.randn(1, D), torch.rand(1, D) + 0.5
    torch.save((mean, std), tmp_path / "ViT-L-14_stats.th")
    model = load_unclip_model(TINY["l"], ckpts["l"], clip_stats=tmp_path / "ViT-L-14_stats.th")
    assert torch.equal(model.noise_augmentor.data_mean, mean)
    assert torch.equal(model.noise_augmentor.data_std, std)
    assert missing_clip_stats_notice(model) is None
    torch.save((torch.zeros(D + 1), torch.ones(D + 1)), tmp_path / "wrong.th")
    with pytest.raises(SdgenError, match="17/17 values"):
        model.load_clip_stats(tmp_path / "wrong.th")
    with pytest.raises(SdgenError, match="not found"):
        model.load_clip_stats(tmp_path / "absent.th")


def test_missing_clip_stats_notice_only_for_unclip_l(model_l, model_h) -> None:
    message = missing_clip_stats_notice(model_l)
    assert message is not None and "--clip-stats" in message and "ViT-L-14_stats.th" in message
    assert missing_clip_stats_notice(model_h) is None


# ---- loading -------------------------------------------------------------------------------------------------------


def test_loaded_weights_equal_the_file(model_l, ckpts) -> None:
    from safetensors.torch import load_file

    ref = load_file(str(ckpts["l"]))
    ours = model_l.state_dict()
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # the file this test wrote: exact on any machine


@pytest.mark.parametrize("variant", ["l", "h"])
def test_image_tower_from_a_separate_file(tmp_path, ckpts, variant) -> None:
    from safetensors.torch import load_file

    full = load_file(str(ckpts[variant]))
    stripped = {k: v for k, v in full.items() if not k.startswith("embedder.")}
    # the CLIP file as its projects ship it: keys visual.*, token_embedding.*, ... (plus an unused text tower)
    clip = {k[len("embedder.model."):]: v for k, v in full.items() if k.startswith("embedder.model.")}
    clip["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(96, 32)
    save_file(stripped, str(tmp_path / "stripped.safetensors"))
    save_file(clip, str(tmp_path / "clip.safetensors"))

    with pytest.raises(SdgenError, match="--embedder-ckpt"):
        load_unclip_model(TINY[variant], tmp_path / "stripped.safetensors")
    model = load_unclip_model(TINY[variant], tmp_path / "stripped.safetensors",
                              embedder_ckpt=tmp_path / "clip.safetensors")
    images = _images(1)
    reference = load_unclip_model(TINY[variant], ckpts[variant])
    # both computed here from the same weights: exact (a same-machine promise, not recorded data)
    torch.testing.assert_close(model.embed_images(images), reference.embed_images(images), rtol=0, atol=0)

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "not-clip.safetensors"))
    with pytest.raises(SdgenError, match="no CLIP image tower"):
        load_unclip_model(TINY[variant], tmp_path / "stripped.safetensors",
                          embedder_ckpt=tmp_path / "not-clip.safetensors")


def test_torchscript_clip_file_gets_a_way_out(tmp_path, ckpts) -> None:
    """OpenAI ships ViT-L-14.pt as TorchScript: refused (no code is run) with how to convert it."""
    from safetensors.torch import load_file

    stripped = {k: v for k, v in load_file(str(ckpts["l"])).items() if not k.startswith("embedder.")}
    save_file(stripped, str(tmp_path / "stripped.safetensors"))
    traced = torch.jit.trace(torch.nn.Conv2d(3, 4, 2), torch.zeros(1, 3, 4, 4))
    torch.jit.save(traced, str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(SdgenError, match="TorchScript archive.*save_file"):
        load_unclip_model(TINY["l"], tmp_path / "stripped.safetensors", embedder_ckpt=tmp_path / "ViT-L-14.pt")


def test_unused_text_side_leftovers_are_optional(tmp_path, ckpts) -> None:
    from safetensors.torch import load_file

    full = load_file(str(ckpts["l"]))
    visual_only = {k: v for k, v in full.items()
                   if not k.startswith("embedder.") or k.startswith("embedder.model.visual.")}
    save_file(visual_only, str(tmp_path / "visual-only.safetensors"))
    model = load_unclip_model(TINY["l"], tmp_path / "visual-only.safetensors")
    assert not hasattr(model.embedder.model, "token_embedding")
    assert set(model.state_dict()) == set(visual_only)
    images = _images(1)
    reference = load_unclip_model(TINY["l"], ckpts["l"])
    # both computed here from the same weights: exact (a same-machine promise, not recorded data)
    torch.testing.assert_close(model.embed_images(images), reference.embed_images(images), rtol=0, atol=0)

    # a part that is stored must be complete
    partial = dict(visual_only)
    partial["embedder.model.ln_final.weight"] = full["embedder.model.ln_final.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SdgenError, match="missing keys.*ln_final.bias"):
        load_unclip_model(TINY["l"], tmp_path / "partial.safetensors")


def test_non_unclip_inputs_get_a_clear_error(ckpts) -> None:
    with pytest.raises(SdgenError, match=r"not a Stable unCLIP checkpoint.*sd21-unclip-l\.ckpt.*sd21-unclip-h\.ckpt"):
        load_unclip_model(TINY["l"], ckpts["sd2v"])
    with pytest.raises(SdgenError, match=r"does not build a Stable unCLIP model.*sd21-unclip-l\.ckpt"):
        load_unclip_model(SD2V_TINY, ckpts["l"])
    with pytest.raises(SdgenError, match="does not fit the model"):
        load_unclip_model(TINY["h"], ckpts["l"])


# ---- v-prediction through the shared pipeline (SD 2.x 768-v layout) -------------------------------------------


def test_sd2v_generate_equals_sai2_ddim_v_written_out(ckpts) -> None:
    """generate() on a v-model equals SAI2's DDIM loop for v written out here (CFG on v, eta 0)."""
    from ldm.checkpoint import load_model
    from ldm.generation.api import generate_images
    from ldm.sampling.schedules import ddim_timesteps

    model = load_model(str(SD2V_TINY), ckpts["sd2v"])
    assert model.parameterization == "v"
    steps, scale, seed = 10, 7.0, 3
    latents = []

    def decode(z: torch.Tensor) -> torch.Tensor:  # records the latent generate() decodes
        latents.append(z)
        return type(model).decode_first_stage(model, z)

    model.decode_first_stage = decode
    try:
        next(iter(generate_images(model, "a red cube", negative_prompt="blurry", steps=steps, scale=scale,
                                  height=32, width=32, seed=seed)))
    finally:
        del model.decode_first_stage

    acp = model.alphas_cumprod  # float32, as the original reads its buffers
    ts = ddim_timesteps(steps, 1000)
    c = model.get_learned_conditioning(["a red cube"])
    uc = model.get_learned_conditioning(["blurry"])
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i in reversed(range(len(ts))):
            a, a_prev = acp[ts[i]], (acp[ts[i - 1]] if i > 0 else acp[0])
            t = torch.full((2,), int(ts[i]), dtype=torch.long)
            v_u, v_c = model.apply_model(torch.cat([x, x]), t, {"crossattn": torch.cat([uc, c])}).chunk(2)
            v = v_u + scale * (v_c - v_u)
            eps = a.sqrt() * v + (1 - a).sqrt() * x
            x0 = a.sqrt() * x - (1 - a).sqrt() * v
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    # float32 on both sides; the final latent reaches |x| ~ 10, so the absolute tolerance is relative to that
    torch.testing.assert_close(latents[0], x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
