"""Text/image encoders and the unCLIP noise augmentor: checkpoint keys, layer semantics, golden values.

Key tests build the full-size encoders on the meta device and compare with the released manifests.
Semantics use the golden tiny sizes and the golden tiny weights, against a direct transformer computation
written out here (independent of transformers / open_clip).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.errors import SdgenError
from ldm.modules.encoders.image_embedders import (
    CLIP_MEAN,
    CLIP_STD,
    ClipImageEmbedder,
    CLIPEmbeddingNoiseAugmentation,
    FrozenOpenCLIPImageEmbedder,
)
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from ldm.modules.encoders.tokenizer import tokenize_hf, tokenize_open_clip
from tests.golden import adm_tolerance, case_config, case_data, case_state_dict, released_manifest, sub_state_dict
from tests.tolerance import Tolerance, assert_matches_recorded

SIZES = case_config("sd1").golden_tiny_encoder_sizes
HF_TINY = dict(SIZES.hf_clip_text)
H_TINY = {k: dict(v) for k, v in SIZES.openclip_overrides["ViT-H-14"].items() if k != "embed_dim"}
H_TINY["embed_dim"] = SIZES.openclip_overrides["ViT-H-14"].embed_dim
BIGG_TINY = {k: dict(v) for k, v in SIZES.openclip_overrides["ViT-bigG-14"].items() if k != "embed_dim"}
BIGG_TINY["embed_dim"] = SIZES.openclip_overrides["ViT-bigG-14"].embed_dim
OPENAI_TINY = dict(SIZES.openai_clip["ViT-L/14"])
PROMPTS = ["a photograph of an astronaut riding a horse", "", "red cat, blue dog, green bird on a long table"]
NOISE_CFG = {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def manifest_part(name, prefix):
    keys = released_manifest(name)["keys"]
    return {k[len(prefix):]: list(v) for k, v in keys.items() if k.startswith(prefix)}


def keys_and_shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# --- released checkpoint keys (meta device) --------------------------------------------------------------

BIGG = dict(arch="ViT-bigG-14", layer="penultimate", always_return_pooled=True, legacy=False)
MANIFEST_CASES = [
    ("sd-v1-4", "cond_stage_model.", lambda: FrozenCLIPEmbedder()),
    ("v2-1_768-ema-pruned", "cond_stage_model.", lambda: FrozenOpenCLIPEmbedder(layer="penultimate")),
    ("sd_xl_base_0.9", "conditioner.embedders.0.", lambda: FrozenCLIPEmbedder(layer="hidden", layer_idx=11)),
    ("sd_xl_base_0.9", "conditioner.embedders.1.", lambda: FrozenOpenCLIPEmbedder2(**BIGG)),
    ("sd_xl_refiner_0.9", "conditioner.embedders.0.", lambda: FrozenOpenCLIPEmbedder2(**BIGG)),
    ("sd21-unclip-l", "embedder.", lambda: ClipImageEmbedder()),
    ("sd21-unclip-h", "embedder.", lambda: FrozenOpenCLIPImageEmbedder()),
    ("sd21-unclip-l", "cond_stage_model.", lambda: FrozenOpenCLIPEmbedder(layer="penultimate")),
    ("sd21-unclip-l", "noise_augmentor.", lambda: CLIPEmbeddingNoiseAugmentation(NOISE_CFG, 768)),
    ("sd21-unclip-h", "noise_augmentor.", lambda: CLIPEmbeddingNoiseAugmentation(NOISE_CFG, 1024)),
]
# transformers >= 4.31 no longer saves CLIP's position_ids buffer, which the released SD 1.x / SDXL files
# (written with transformers 4.19) hold; the checkpoint loader drops that key. Equality is modulo this key.
POSITION_IDS = "transformer.text_model.embeddings.position_ids"


@pytest.mark.parametrize("name,prefix,build", MANIFEST_CASES, ids=[f"{n}:{p}" for n, p, _ in MANIFEST_CASES])
def test_meta_build_has_exactly_the_released_keys(name, prefix, build):
    with torch.device("meta"):
        module = build()
    ours, ref = keys_and_shapes(module), manifest_part(name, prefix)
    if POSITION_IDS in ref:
        assert ref.pop(POSITION_IDS) == [1, 77]
        assert POSITION_IDS not in ours
        ids = dict(module.named_buffers())[POSITION_IDS]
        assert torch.equal(ids, torch.arange(77)[None])
    assert ours == ref
    # everything that is not in the checkpoint is real (CPU) data, so a meta build is complete after loading
    for buf_name, buf in module.named_buffers():
        if buf_name not in ours:
            assert buf.device.type == "cpu", buf_name


def test_open_clip_causal_mask_is_not_a_checkpoint_key():
    with torch.device("meta"):
        m = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert "model.attn_mask" not in m.state_dict()
    mask = m.model.attn_mask
    assert mask.shape == (77, 77) and mask[0, 1] == float("-inf") and mask[1, 0] == 0 and mask[5, 5] == 0


# --- a direct transformer computation ----------------------------------------------------------------------


def ref_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    b, n, d = x.shape
    q, k, v = (F.linear(x, w, bias).reshape(b, n, heads, d // heads).transpose(1, 2) for w, bias in
               ((wq, bq), (wk, bk), (wv, bv)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores + torch.full((n, n), float("-inf")).triu(1)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return F.linear(out, wo, bo)


def ref_layer_norm(x, sd, prefix, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def ref_hf_clip_states(sd, tokens, heads):
    """Pre-LN CLIP text transformer with QuickGELU (HF names); returns the embeddings and each layer output."""
    p = "transformer.text_model."
    x = sd[p + "embeddings.token_embedding.weight"][tokens] + sd[p + "embeddings.position_embedding.weight"]
    states = [x]
    i = 0
    while f"{p}encoder.layers.{i}.mlp.fc1.weight" in sd:
        lp = f"{p}encoder.layers.{i}."
        h = ref_layer_norm(x, sd, lp + "layer_norm1")
        a = [sd[lp + f"self_attn.{n}_proj.{t}"] for n in "qkv" for t in ("weight", "bias")]
        x = x + ref_attention(h, *a, sd[lp + "self_attn.out_proj.weight"], sd[lp + "self_attn.out_proj.bias"], heads)
        h = F.linear(ref_layer_norm(x, sd, lp + "layer_norm2"), sd[lp + "mlp.fc1.weight"], sd[lp + "mlp.fc1.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[lp + "mlp.fc2.weight"], sd[lp + "mlp.fc2.bias"])
        states.append(x)
        i += 1
    return states


def ref_open_clip_states(sd, tokens, heads):
    """Pre-LN open_clip text transformer with GELU (packed in_proj); embeddings and each block output."""
    x = sd["model.token_embedding.weight"][tokens] + sd["model.positional_embedding"]
    states = [x]
    i = 0
    while f"model.transformer.resblocks.{i}.ln_1.weight" in sd:
        bp = f"model.transformer.resblocks.{i}."
        wq, wk, wv = sd[bp + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[bp + "attn.in_proj_bias"].chunk(3)
        h = ref_layer_norm(x, sd, bp + "ln_1")
        x = x + ref_attention(h, wq, bq, wk, bk, wv, bv, sd[bp + "attn.out_proj.weight"],
                              sd[bp + "attn.out_proj.bias"], heads)
        h = F.linear(ref_layer_norm(x, sd, bp + "ln_2"), sd[bp + "mlp.c_fc.weight"], sd[bp + "mlp.c_fc.bias"])
        x = x + F.linear(F.gelu(h), sd[bp + "mlp.c_proj.weight"], sd[bp + "mlp.c_proj.bias"])
        states.append(x)
        i += 1
    return states


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- FrozenCLIPEmbedder (HF CLIP-L text) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_text_weights():
    return sub_state_dict(case_state_dict("sd1"), "cond_stage_model.")


def tiny_clip(weights, **kw):
    m = FrozenCLIPEmbedder(text_config=HF_TINY, **kw)
    m.load_state_dict(weights, strict=True)
    return m


def test_clip_last_hidden_and_pooled_match_direct_computation(sd1_text_weights):
    tokens = tokenize_hf(PROMPTS)
    states = ref_hf_clip_states(sd1_text_weights, tokens, heads=2)
    last = ref_layer_norm(states[-1], sd1_text_weights, "transformer.text_model.final_layer_norm")

    z = tiny_clip(sd1_text_weights)(PROMPTS)  # SD 1.x: last_hidden_state, after the final LayerNorm
    assert z.shape == (3, 77, 32)
    close(z, last)

    for idx in range(4):  # SDXL: hidden_states[idx], no final LayerNorm (idx 2 = penultimate of 3 layers)
        close(tiny_clip(sd1_text_weights, layer="hidden", layer_idx=idx)(PROMPTS), states[idx])

    _, pooled = tiny_clip(sd1_text_weights, layer="hidden", layer_idx=2, always_return_pooled=True)(PROMPTS)
    eot = (tokens == 49407).int().argmax(-1)  # first EOS = the end of the prompt
    close(pooled, last[torch.arange(3), eot])
    close(tiny_clip(sd1_text_weights, layer="pooled")(PROMPTS), last[torch.arange(3), eot][:, None])


def test_clip_padding_is_eos_and_prefix_is_causal(sd1_text_weights):
    m = tiny_clip(sd1_text_weights)
    tokens = m.tokenize(PROMPTS)
    assert tokens[1, 1:].eq(49407).all()
    short, longer = m(["a red cat"]), m(["a red cat sitting on a mat"])
    close(short[:, :4], longer[:, :4])  # BOS + 3 tokens see nothing after them
    assert not torch.allclose(short[:, 4:], longer[:, 4:])


def test_clip_layer_checks():
    with pytest.raises(SdgenError):
        FrozenCLIPEmbedder(text_config=HF_TINY, layer="hidden")
    with pytest.raises(SdgenError):
        FrozenCLIPEmbedder(text_config=HF_TINY, layer="hidden", layer_idx=4)
    with pytest.raises(SdgenError):
        FrozenCLIPEmbedder(text_config=HF_TINY, layer="penultimate")


def test_frozen_and_trainable(sd1_text_weights):
    frozen = tiny_clip(sd1_text_weights)
    frozen.train()
    assert not frozen.training and not frozen.transformer.training
    assert not any(p.requires_grad for p in frozen.parameters())

    trainable = FrozenCLIPEmbedder(text_config=HF_TINY, freeze=False)
    trainable.train()
    assert trainable.transformer.training
    trainable(["a cat"]).pow(2).mean().backward()
    grad = trainable.transformer.text_model.encoder.layers[0].mlp.fc1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# --- OpenCLIP text (SD 2.x legacy, SDXL bigG) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_text_weights():
    return sub_state_dict(case_state_dict("sd2v"), "cond_stage_model.")


@pytest.fixture(scope="module")
def bigg_weights():
    return sub_state_dict(case_state_dict("sdxl-refiner"), "conditioner.embedders.0.")


def test_sd2_penultimate_is_ln_final_of_all_but_last_block(sd2_text_weights):
    m = FrozenOpenCLIPEmbedder(layer="penultimate", model_cfg=H_TINY)
    m.load_state_dict(sd2_text_weights, strict=True)
    tokens = tokenize_open_clip(PROMPTS)
    assert tokens[1, 2:].eq(0).all()  # open_clip pads with 0
    states = ref_open_clip_states(sd2_text_weights, tokens, heads=2)
    z = m(PROMPTS)
    assert z.shape == (3, 77, 32)
    close(z, ref_layer_norm(states[-2], sd2_text_weights, "model.ln_final"))

    last = FrozenOpenCLIPEmbedder(layer="last", model_cfg=H_TINY)
    last.load_state_dict(sd2_text_weights, strict=True)
    close(last(PROMPTS), ref_layer_norm(states[-1], sd2_text_weights, "model.ln_final"))


def test_batch_first_layout_is_right_when_batch_equals_tokens(sd2_text_weights):
    """A sequence-first/batch-first mix-up is silent when B == L: compare a 77-prompt batch row by row."""
    m = FrozenOpenCLIPEmbedder(layer="penultimate", model_cfg=H_TINY)
    m.load_state_dict(sd2_text_weights, strict=True)
    prompts = [f"prompt number {i}" for i in range(77)]
    full = m(prompts)
    for i in (0, 40, 76):
        close(full[i : i + 1], m([prompts[i]]))


def test_sdxl_bigg_penultimate_without_ln_and_pooled(bigg_weights):
    m = FrozenOpenCLIPEmbedder2(model_cfg=BIGG_TINY, **BIGG)
    m.load_state_dict(bigg_weights, strict=True)
    tokens = tokenize_open_clip(PROMPTS)
    states = ref_open_clip_states(bigg_weights, tokens, heads=2)
    z, pooled = m(PROMPTS)
    assert z.shape == (3, 77, 32) and pooled.shape == (3, 16)
    close(z, states[-2])  # non-legacy: no ln_final on the crossattn output
    final = ref_layer_norm(states[-1], bigg_weights, "model.ln_final")
    eot = tokens.argmax(-1)
    assert eot.tolist() == [(t == 49407).nonzero()[0].item() for t in tokens]
    close(pooled, final[torch.arange(3), eot] @ bigg_weights["model.text_projection"])

    legacy = FrozenOpenCLIPEmbedder2(arch="ViT-bigG-14", layer="penultimate", legacy=True, model_cfg=BIGG_TINY)
    legacy.load_state_dict(bigg_weights, strict=True)
    close(legacy(PROMPTS), ref_layer_norm(states[-2], bigg_weights, "model.ln_final"))


# --- image embedders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_l_image():
    m = ClipImageEmbedder(model_cfg=OPENAI_TINY)
    m.load_state_dict(sub_state_dict(case_state_dict("unclip-l"), "embedder."), strict=True)
    return m


def test_image_preprocessing_resizes_without_crop_and_normalises(clip_l_image):
    const = torch.tensor([-1.0, 0.2, 0.6]).reshape(1, 3, 1, 1).expand(2, 3, 40, 96)
    out = clip_l_image.preprocess(const)
    assert out.shape == (2, 3, 224, 224)
    expected = (((torch.tensor([-1.0, 0.2, 0.6]) + 1) / 2) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    close(out, expected.reshape(1, 3, 1, 1).expand_as(out))


def test_clip_image_embedding(clip_l_image):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb = clip_l_image(x)
    assert emb.shape == (2, 16)
    close(emb, clip_l_image.model.visual(clip_l_image.preprocess(x)))
    assert not torch.allclose(emb[0], emb[1])
    # OpenAI CLIP uses QuickGELU in both towers; OpenCLIP ViT-H uses the exact GELU
    assert type(clip_l_image.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(clip_l_image.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    h = FrozenOpenCLIPImageEmbedder(model_cfg=H_TINY)
    assert isinstance(h.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert not hasattr(h.model, "transformer")
    assert h(x).shape == (2, 16)


# --- unCLIP noise augmentation (golden README section 3a) ----------------------------------------------------


@pytest.fixture(scope="module")
def unclip():
    return case_data("unclip-l"), case_state_dict("unclip-l")


def golden_augmentor(data):
    aug = CLIPEmbeddingNoiseAugmentation(NOISE_CFG, timestep_dim=16)
    aug.data_mean = data["noise_aug.data_mean"].clone()
    aug.data_std = data["noise_aug.data_std"].clone()
    return aug


def test_noise_augmentor_schedule_buffers_equal_reference(unclip):
    _, sd = unclip
    aug = CLIPEmbeddingNoiseAugmentation(NOISE_CFG, timestep_dim=16)
    ref = sub_state_dict(sd, "noise_augmentor.")
    assert set(aug.state_dict()) == set(ref)
    for k, v in aug.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k
    assert aug.data_mean.shape == (1, 16) and aug.data_mean.abs().sum() == 0 and aug.data_std.eq(1).all()


@pytest.mark.parametrize("level", [0, 100, 500])
def test_noise_augmentation_equals_golden(unclip, level):
    data, _ = unclip
    aug = golden_augmentor(data)
    for lv in (level, torch.tensor([level])):
        z, emb = aug(data["embedding"], lv, noise=data["noise_aug.noise"])
        adm = adm_tolerance(level)  # made on another CPU: [augmentation | level embedding] bounds
        assert_matches_recorded(torch.cat([z, emb], 1), data[f"noise_aug.level{level}.adm"], adm)
        assert_matches_recorded(z, data[f"noise_aug.level{level}.augmented_embedding"],
                                Tolerance(adm.why, abs=adm.abs[:, :16], rel=adm.rel))
        assert_matches_recorded(emb, data[f"noise_aug.level{level}.level_embedding"],
                                Tolerance(adm.why, abs=adm.abs[:, 16:], rel=adm.rel))


def test_noise_augmentation_generator_and_checks(unclip, tmp_path):
    data, _ = unclip
    aug = golden_augmentor(data)
    x = data["embedding"].repeat(2, 1)
    a, _ = aug(x, 250, generator=torch.Generator().manual_seed(7))
    b, _ = aug(x, 250, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    c, _ = aug(x, 250, noise=noise)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.allclose(a[0], a[1])
    with pytest.raises(SdgenError):
        aug(x, 1000)

    stats = tmp_path / "stats.th"
    torch.save((torch.arange(16.0), torch.full((16,), 2.0)), stats)
    loaded = CLIPEmbeddingNoiseAugmentation(NOISE_CFG, 16, clip_stats_path=str(stats))
    assert torch.equal(loaded.data_mean, torch.arange(16.0)[None]) and loaded.data_std.eq(2).all()
    assert "data_mean" not in loaded.state_dict()
    with pytest.raises(SdgenError, match="ViT-L-14_stats"):
        CLIPEmbeddingNoiseAugmentation(NOISE_CFG, 16, clip_stats_path=str(tmp_path / "missing.th"))


def test_noise_augmentation_half_precision_input(unclip):
    data, _ = unclip
    aug = golden_augmentor(data)
    z32, e32 = aug(data["embedding"], 100, noise=data["noise_aug.noise"])
    z16, e16 = aug(data["embedding"].half(), 100, noise=data["noise_aug.noise"])
    assert z16.dtype == e16.dtype == torch.float16
    torch.testing.assert_close(z16.float(), z32, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(e16.float(), e32, rtol=2e-3, atol=2e-3)
    assert set(aug.keep_fp32_buffers) >= set(aug.state_dict()) | {"data_mean", "data_std"}
