"""The bundled full-size configs build models whose state_dict matches the released files' key manifests.

Built on the meta device (no weights, no memory), so this checks every key and shape of the released
checkpoints (tests/data/manifests) without having them.
"""

from __future__ import annotations

import re

import pytest
import torch

from ldm.checkpoint import KNOWN_EXTRA_KEYS, build_model_on_meta, classify_keys
from ldm.model_files import bundled_config
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from tests.golden import released_manifest

# config -> (manifest, reference keys our model does not have, with why)
CASES = {
    "configs/stable-diffusion/v1-inference.yaml": (
        "sd-v1-4",
        # a persistent buffer in transformers 4.19 (the reference pin), non-persistent since 4.31
        {"cond_stage_model.transformer.text_model.embeddings.position_ids"},
    ),
    "configs/stable-diffusion/v2-inference-v.yaml": ("v2-1_768-ema-pruned", set()),
    "configs/stable-diffusion/v2-inpainting-inference.yaml": ("512-inpainting-ema", set()),
    "configs/stable-diffusion/v2-midas-inference.yaml": ("512-depth-ema", set()),
    "configs/stable-diffusion/x4-upscaling.yaml": ("x4-upscaler-ema", set()),
}

# manifest param_counts label prefix -> module path in LatentDiffusion
COMPONENTS = {"model.diffusion_model": "model.diffusion_model", "first_stage_model": "first_stage_model",
              "cond_stage_model": "cond_stage_model", "depth_model": "depth_model", "low_scale_model": "low_scale_model"}


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    config = request.param
    return config, build_model_on_meta(bundled_config(config))


def test_keys_and_shapes_match_the_manifest(built):
    config, model = built
    name, only_in_reference = CASES[config]
    manifest = released_manifest(name)
    ref = {k: list(v) for k, v in manifest["keys"].items()}
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ref) ^ set(ours) == only_in_reference
    assert {k: ours[k] for k in ours} == {k: ref[k] for k in ours}
    # the schedule buffers are float32 as in the reference
    for key, dtype in manifest["buffers"].items():
        if key in ours:
            assert str(model.state_dict()[key].dtype) == f"torch.{dtype}", key


def test_parameter_counts_match_the_manifest(built):
    config, model = built
    counts = released_manifest(CASES[config][0])["param_counts"]
    total = 0
    for label, expected in counts.items():
        if label == "total":
            continue
        path = COMPONENTS[label.split(" ")[0]]
        module = model.get_submodule(path)
        assert sum(p.numel() for p in module.parameters()) == expected, label
        total += expected
    assert total == counts["total"] == sum(p.numel() for p in model.parameters())


def test_nonpersistent_buffers_exist_but_are_not_saved(built):
    config, model = built
    manifest = released_manifest(CASES[config][0])
    buffers = dict(model.named_buffers())
    saved = model.state_dict()
    for name in manifest["nonpersistent_buffers_not_in_state_dict"]:
        assert name in buffers and name not in saved, name
        assert not buffers[name].is_meta, name


def test_released_key_set_would_load(built):
    """The manifest's keys plus the extras the released file is expected to hold pass the strict check."""
    config, model = built
    manifest = released_manifest(CASES[config][0])
    file_keys = dict(manifest["keys"])
    file_keys.update(manifest.get("expected_extra_keys_in_released_file") or {})
    file_keys.update(manifest.get("possible_extra_keys_in_released_file") or {})
    report = classify_keys(model.state_dict(keep_vars=True), file_keys)
    assert report.ok, (report.missing[:3], report.unexpected[:3], report.wrong_shape[:3])
    extras = set(file_keys) - set(model.state_dict())
    assert set(report.dropped) == extras and extras >= {"model_ema.decay", "model_ema.num_updates"}
    assert all(any(re.search(p, k) for p, _ in KNOWN_EXTRA_KEYS) for k in extras)
    # a file without the schedule buffers would also load (they are computed from the config)
    no_schedule = {k: v for k, v in file_keys.items() if k not in SCHEDULE_BUFFERS}
    report = classify_keys(model.state_dict(keep_vars=True), no_schedule)
    assert report.ok and sorted(report.recomputed) == sorted(SCHEDULE_BUFFERS)


def test_only_parameters_are_on_meta(built):
    _, model = built
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.alphas_cumprod.dtype == torch.float32 and model.alphas_cumprod.shape == (1000,)
