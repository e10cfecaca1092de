"""SDXL GeneralConditioner and size/crop/aesthetic Fourier embedders (golden README sections 4a, 5a)."""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.errors import SdgenError
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND, GeneralConditioner
from tests.golden import FOURIER_INPUTS, case_config, case_data, case_state_dict, fourier_tolerance, sub_state_dict
from tests.tolerance import assert_matches_recorded

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def golden_conditioner(case):
    """The case's conditioner from its yaml, with the tiny encoder sizes and the golden weights."""
    cfg = case_config(case)
    sizes = OmegaConf.to_container(cfg.golden_tiny_encoder_sizes)
    emb_models = OmegaConf.to_container(cfg.model.params.conditioner_config.params.emb_models)
    for emb in emb_models:
        if emb["target"].endswith("FrozenCLIPEmbedder"):
            emb["params"]["text_config"] = sizes["hf_clip_text"]
        elif emb["target"].endswith("FrozenOpenCLIPEmbedder2"):
            emb["params"]["model_cfg"] = sizes["openclip_overrides"][emb["params"]["arch"]]
    cond = GeneralConditioner(emb_models)
    cond.load_state_dict(sub_state_dict(case_state_dict(case), "conditioner."), strict=True)
    return cond


@pytest.fixture(scope="module")
def base():
    return golden_conditioner("sdxl-base"), case_data("sdxl-base")


@pytest.fixture(scope="module")
def refiner():
    return golden_conditioner("sdxl-refiner"), case_data("sdxl-refiner")


def base_batch(data, prompts):
    batch = {"txt": prompts}
    for k in SIZE_KEYS:
        batch[k] = data[f"in.{k}"].repeat(len(prompts), 1)
    return batch


def test_fourier_vector_equals_golden_sdxl_base():
    data = case_data("sdxl-base")
    emb = ConcatTimestepEmbedderND(256)
    vec = torch.cat([emb(data[f"in.{k}"]) for k in SIZE_KEYS], 1)
    assert vec.shape == (1, 1536) and vec.dtype == torch.float32
    assert_matches_recorded(vec, data["vector_fourier"], fourier_tolerance(data, "vector_fourier"))


def test_fourier_vector_equals_golden_sdxl_refiner():
    data = case_data("sdxl-refiner")
    emb = ConcatTimestepEmbedderND(256)
    for name in ("vector_fourier.aes6", "vector_fourier.aes2_5"):
        vec = torch.cat([emb(data[k]) for k in FOURIER_INPUTS[name]], 1)
        assert_matches_recorded(vec, data[name], fourier_tolerance(data, name), name)
    # a 1-D input is one number per sample
    torch.testing.assert_close(emb(torch.tensor([6.0])), emb(data["in.aesthetic_score.c"]), rtol=0, atol=0)


def test_fourier_blocks_are_per_number_in_input_order():
    out = ConcatTimestepEmbedderND(8)(torch.tensor([[3, 700], [5, 1]]))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out[:, :8], timestep_embedding(torch.tensor([3, 5]), 8))
    torch.testing.assert_close(out[:, 8:], timestep_embedding(torch.tensor([700, 1]), 8))


def test_base_routing_and_concatenation(base):
    cond, data = base
    prompts = ["a cat", "a photograph of an astronaut riding a horse"]
    out = cond(base_batch(data, prompts))
    assert set(out) == {"crossattn", "vector"}
    assert out["crossattn"].shape == (2, 77, 64) and out["vector"].shape == (2, 1552)
    clip_l, bigg = cond.embedders[0], cond.embedders[1]
    torch.testing.assert_close(out["crossattn"][..., :32], clip_l(prompts), rtol=0, atol=0)
    tokens, pooled = bigg(prompts)
    torch.testing.assert_close(out["crossattn"][..., 32:], tokens, rtol=0, atol=0)
    torch.testing.assert_close(out["vector"][:, :16], pooled, rtol=0, atol=0)
    for row in out["vector"][:, 16:]:
        assert_matches_recorded(row[None], data["vector_fourier"], fourier_tolerance(data, "vector_fourier"))


def test_base_unconditional_zeroes_text_only(base):
    cond, data = base
    batch = base_batch(data, ["a cat"])
    c, uc = cond.get_unconditional_conditioning(batch, force_uc_zero_embeddings=["txt"])
    assert c["crossattn"].abs().sum() > 0 and c["vector"][:, :16].abs().sum() > 0
    assert uc["crossattn"].eq(0).all() and uc["vector"][:, :16].eq(0).all()
    torch.testing.assert_close(uc["vector"][:, 16:], c["vector"][:, 16:], rtol=0, atol=0)


def test_refiner_vector_layout(refiner):
    cond, data = refiner
    batch = {
        "txt": ["a cat", ""],
        "original_size_as_tuple": data["in.original_size_as_tuple"].repeat(2, 1),
        "crop_coords_top_left": data["in.crop_coords_top_left"].repeat(2, 1),
        "aesthetic_score": torch.cat([data["in.aesthetic_score.c"], data["in.aesthetic_score.uc"]]),
    }
    out = cond(batch)
    assert out["crossattn"].shape == (2, 77, 32) and out["vector"].shape == (2, 1296)
    for row, name in zip(out["vector"][:, 16:], ("vector_fourier.aes6", "vector_fourier.aes2_5")):
        assert_matches_recorded(row[None], data[name], fourier_tolerance(data, name), name)


def test_embedders_are_frozen_and_keys_follow_config_order(base):
    cond, _ = base
    assert not any(p.requires_grad for p in cond.parameters())
    keys = cond.state_dict().keys()
    assert any(k.startswith("embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("embedders.1.model.transformer.resblocks.") for k in keys)
    assert [e.input_key for e in cond.embedders] == ["txt", "txt", *SIZE_KEYS]


def fourier_only(**extra):
    entry = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 4}}
    return GeneralConditioner([{**entry, "input_key": "size", **extra}])


def test_condition_dropout_only_in_training():
    cond = fourier_only(ucg_rate=1.0)
    batch = {"size": torch.tensor([[64.0, 32.0]])}
    assert cond.eval()(batch)["vector"].abs().sum() > 0
    assert cond.train()(batch, generator=torch.Generator().manual_seed(0))["vector"].eq(0).all()
    c, uc = cond.get_unconditional_conditioning(batch)
    assert c["vector"].abs().sum() > 0 and torch.equal(c["vector"], uc["vector"])
    assert cond.training


def test_missing_input_key_is_an_error():
    with pytest.raises(SdgenError):
        GeneralConditioner([{"target": "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND",
                             "params": {"outdim": 4}}])
