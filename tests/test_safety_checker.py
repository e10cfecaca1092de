"""The safety checker: scoring maths on hand-made embeddings, preprocessing, loading, replacement."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.errors import SdgenError
from ldm.safety import checker as checker_mod
from ldm.safety.checker import (
    SafetyChecker,
    apply_safety_checker,
    load_safety_checker,
    preprocess,
    resolve_safety_checker,
    score_embeddings,
)

TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "image_size": 32,
    "patch_size": 8,
}


def unit(*coords: float, dim: int = 4) -> torch.Tensor:
    v = torch.zeros(dim)
    v[: len(coords)] = torch.tensor(coords)
    return v / v.norm()


def embedding_with_cos(cos: float) -> torch.Tensor:
    """A unit vector in the (e0, e1) plane whose cosine with e0 is ``cos``."""
    return torch.tensor([cos, (1 - cos**2) ** 0.5, 0.0, 0.0])


def test_scoring_threshold_and_rounding() -> None:
    e0 = unit(1.0)
    concepts = torch.stack([e0, unit(0.0, 0.0, 1.0)])
    specials = torch.stack([unit(0.0, 0.0, 0.0, 1.0)])
    concept_w = torch.tensor([0.8, 0.5])
    special_w = torch.tensor([0.9])
    images = torch.stack([
        embedding_with_cos(0.85),  # 0.85 - 0.8 = 0.05 > 0: flagged
        embedding_with_cos(0.7996),  # -0.0004 rounds to -0.0: not flagged
        embedding_with_cos(0.8004),  # 0.0004 rounds to 0.0 (not > 0): not flagged
        embedding_with_cos(0.8006),  # 0.0006 rounds to 0.001: flagged
        embedding_with_cos(0.3),
    ])
    res = score_embeddings(images, concepts, concept_w, specials, special_w)
    assert [r.flagged for r in res] == [True, False, False, True, False]
    assert res[0].bad_concepts == [0] and res[0].concept_scores[0] == pytest.approx(0.05)
    assert res[2].concept_scores[0] == 0.0 and res[3].concept_scores[0] == 0.001
    # concept 1 (e2) is orthogonal to every image: cos 0 - 0.5
    assert all(r.concept_scores[1] == -0.5 for r in res)
    assert all(r.special_care == [] for r in res)


def test_special_care_adjustment() -> None:
    """A special-care hit lowers every later threshold by 0.01; on its own it does not flag."""
    # image = (a e0 + b e1 + c e3), unit; specials: e3 (thr 0.2), e1 (thr 0.25); concepts: e0 (thr 0.7)
    e0, e1, e3 = unit(1.0), unit(0.0, 1.0), unit(0.0, 0.0, 0.0, 1.0)
    specials = torch.stack([e3, e1])
    special_w = torch.tensor([0.2, 0.25])
    concepts = torch.stack([e0])
    concept_w = torch.tensor([0.7])

    def image(a: float, b: float, c: float) -> torch.Tensor:
        return torch.tensor([a, b, 0.0, c])  # unit length: c is chosen below

    a = 0.695
    b = 0.245
    c = (1 - a**2 - b**2) ** 0.5  # about 0.676 > 0.2: special-care hit on e3
    res = score_embeddings(image(a, b, c)[None], concepts, concept_w, specials, special_w)[0]
    # e1 score: 0.245 - 0.25 + 0.01 = 0.005 > 0 thanks to the adjustment from the first hit
    assert res.special_scores[1] == 0.005 and res.special_care == [0, 1]
    # concept e0: 0.695 - 0.7 + 0.01 = 0.005 > 0: flagged only because of the adjustment
    assert res.concept_scores == [0.005] and res.flagged
    # without the special-care hit (c small, the rest in e2) the same concept cosine is not flagged
    other = torch.tensor([a, b, (1 - a**2 - b**2 - 0.01) ** 0.5, 0.1])
    res2 = score_embeddings(other[None], concepts, concept_w, specials, special_w)[0]
    assert res2.special_care == [] and res2.concept_scores == [-0.005] and not res2.flagged
    # a special-care hit alone does not flag
    lone = score_embeddings(e3[None], concepts, concept_w, specials, special_w)[0]
    assert lone.special_care == [0] and not lone.flagged


def test_scoring_matches_written_out_formula() -> None:
    """Random embeddings against the reference loop written out with numpy (cosine in float32)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 16, generator=g)
    concepts, specials = torch.randn(17, 16, generator=g), torch.randn(3, 16, generator=g)
    concept_w = 0.4 + torch.rand(17, generator=g) * 0.3
    special_w = 0.2 + torch.rand(3, generator=g) * 0.3
    res = score_embeddings(img, concepts, concept_w, specials, special_w)

    def norm(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cos_c = (norm(img.numpy()) @ norm(concepts.numpy()).T).astype(np.float32)
    cos_s = (norm(img.numpy()) @ norm(specials.numpy()).T).astype(np.float32)
    for i in range(6):
        adj = 0.0
        for j in range(3):
            s = round(float(cos_s[i, j]) - float(special_w[j]) + adj, 3)
            assert res[i].special_scores[j] == pytest.approx(s, abs=1.01e-3)
            if s > 0:
                adj = 0.01
        expected_bad = [k for k in range(17) if round(float(cos_c[i, k]) - float(concept_w[k]) + adj, 3) > 0]
        assert res[i].bad_concepts == expected_bad
    assert any(r.flagged for r in res) and not all(r.flagged for r in res)


def test_preprocess_like_clip_feature_extractor() -> None:
    """Shortest side -> size (PIL bicubic), centre crop, CLIP mean/std."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = preprocess([img], size=32)
    assert out.shape == (1, 3, 32, 32)
    resized = np.asarray(img.resize((48, 32), Image.BICUBIC), dtype=np.float64)  # 60 * 32 / 40 = 48
    crop = resized[:, 8:40] / 255.0
    mean, std = np.array(checker_mod.CLIP_MEAN), np.array(checker_mod.CLIP_STD)
    expected = ((crop - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_released_layout_on_meta() -> None:
    """Key names and shapes of the released checker (ViT-L/14 tower, 768-d projection)."""
    with torch.device("meta"):
        sd = SafetyChecker().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}
    assert len(shapes) == 396
    assert shapes["vision_model.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["vision_model.vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes["vision_model.vision_model.embeddings.class_embedding"] == (1024,)
    assert shapes["vision_model.vision_model.pre_layrnorm.weight"] == (1024,)
    assert shapes["vision_model.vision_model.encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["vision_model.vision_model.encoder.layers.0.self_attn.q_proj.bias"] == (1024,)
    assert shapes["vision_model.vision_model.post_layernorm.bias"] == (1024,)
    assert shapes["visual_projection.weight"] == (768, 1024)
    assert shapes["concept_embeds"] == (17, 768) and shapes["concept_embeds_weights"] == (17,)
    assert shapes["special_care_embeds"] == (3, 768) and shapes["special_care_embeds_weights"] == (3,)


def tiny_checker(seed: int = 0) -> SafetyChecker:
    torch.manual_seed(seed)
    checker = SafetyChecker(TINY_VISION, projection_dim=16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        checker.concept_embeds.copy_(torch.randn(17, 16, generator=g))
        checker.special_care_embeds.copy_(torch.randn(3, 16, generator=g))
        checker.concept_embeds_weights.fill_(2.0)  # cosine <= 1: never flags
        checker.special_care_embeds_weights.fill_(2.0)
    return checker.eval()


def test_load_roundtrip_and_errors(tmp_path: Path) -> None:
    checker = tiny_checker()
    sd = {k: v.contiguous() for k, v in checker.state_dict().items() if not k.endswith("position_ids")}
    st = tmp_path / "checker.safetensors"
    save_file(sd, str(st))
    # a .bin as older transformers saved it: with the position_ids buffer, in fp16
    old = dict({k: v.half() for k, v in sd.items()})
    old["vision_model.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    binf = tmp_path / "checker.bin"
    torch.save(old, binf)
    pixels = preprocess([Image.new("RGB", (40, 40), (200, 30, 30))], size=32)
    expected = checker.embed(pixels)
    for path, tol in ((st, 1e-6), (binf, 1e-2)):
        loaded = load_safety_checker(path)
        assert loaded.vision_model.config.num_hidden_layers == 2
        assert loaded.image_size == 32
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
        torch.testing.assert_close(loaded.embed(pixels), expected, atol=tol, rtol=tol)
    broken = dict(sd)
    del broken["visual_projection.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(SdgenError, match="visual_projection.weight"):
        load_safety_checker(tmp_path / "broken.safetensors")
    extra = dict(sd, stray=torch.zeros(1))
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(SdgenError, match="unexpected 1 key.*stray"):
        load_safety_checker(tmp_path / "extra.safetensors")
    with pytest.raises(SdgenError, match="not found"):
        load_safety_checker(tmp_path / "absent.safetensors")


def natural_images() -> torch.Tensor:
    """Two (3, 40, 48) images in [0, 1]: a red-to-blue gradient and a green disc."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    a = torch.stack([1 - xx, 0.2 * yy, xx])
    disc = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.1).float()
    b = torch.stack([0.1 + 0 * xx, 0.3 + 0.6 * disc, 0.2 + 0.1 * yy])
    return torch.stack([a, b])


def test_apply_replaces_flagged_with_black(caplog: pytest.LogCaptureFixture) -> None:
    checker = tiny_checker(1)
    images = natural_images()
    before = images.clone()
    pil = checker_mod.to_pil(images)
    emb = checker.embed(preprocess(pil, 32)).detach()
    cos_ab = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert cos_ab < 0.99
    with torch.no_grad():
        checker.concept_embeds[5] = emb[0]
        checker.concept_embeds_weights[5] = (1.0 + cos_ab) / 2  # image 0 (cos 1) over it, image 1 under
    with caplog.at_level(logging.WARNING, logger="ldm.safety.checker"):
        out, flagged = apply_safety_checker(images, checker)
    assert flagged == [True, False]
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1], images[1])
    assert torch.equal(images, before)
    assert "flagged image(s) 0" in caplog.text
    out_pil, flagged_pil = apply_safety_checker(pil, checker)
    assert flagged_pil == [True, False]
    assert np.asarray(out_pil[0]).max() == 0 and out_pil[0].size == (48, 40)
    assert out_pil[1] is pil[1]


def test_resolve(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker_mod, "_NO_CHECKER_LOGGED", False)
    with caplog.at_level(logging.INFO, logger="ldm.safety.checker"):
        assert resolve_safety_checker(None) is None
        assert resolve_safety_checker(None) is None
        assert resolve_safety_checker(tmp_path / "x.safetensors", disabled=True) is None
    assert caplog.text.count("no safety checker active") == 1
    assert "turned off" in caplog.text
    sd = {k: v.contiguous() for k, v in tiny_checker().state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, str(tmp_path / "c.safetensors"))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"safety_checker": {"path": str(tmp_path / "c.safetensors"),
                                               "vision_config": {"num_attention_heads": 2}}})
    loaded = resolve_safety_checker(None, model_config=cfg)
    assert isinstance(loaded, SafetyChecker) and loaded.vision_model.config.num_attention_heads == 2
    assert isinstance(resolve_safety_checker(tmp_path / "c.safetensors"), SafetyChecker)


def test_config_that_needs_no_checker_or_watermark(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``safety_checker: false`` silences the no-checker warning but an explicit path still loads a checker;
    ``watermark: false`` gives no watermark message (the bundled demo config sets both)."""
    from omegaconf import OmegaConf

    from ldm.safety.watermark import message_for_config

    monkeypatch.setattr(checker_mod, "_NO_CHECKER_LOGGED", False)
    cfg = OmegaConf.create({"safety_checker": False, "watermark": False,
                            "model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion"}})
    with caplog.at_level(logging.INFO, logger="ldm.safety.checker"):
        assert resolve_safety_checker(None, model_config=cfg) is None
    assert "no safety checker active" not in caplog.text and "needs none" in caplog.text
    sd = {k: v.contiguous() for k, v in tiny_checker().state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, str(tmp_path / "c.safetensors"))
    assert isinstance(resolve_safety_checker(tmp_path / "c.safetensors", model_config=cfg), SafetyChecker)
    assert message_for_config(cfg) is None
    assert message_for_config(OmegaConf.create({"model": cfg.model})) is not None
