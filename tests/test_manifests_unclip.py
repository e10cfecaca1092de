"""Full-size Stable unCLIP models from the bundled configs have exactly the released files' keys and shapes.

Built on the meta device (no memory, no weights) from configs/stable-diffusion/v2-1-stable-unclip-{l,h}-
inference.yaml and compared with tests/data/manifests/sd21-unclip-{l,h}.json (every key of the reference
model's state_dict, with its shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.checkpoint import build_model_on_meta
from ldm.model_id import identify
from ldm.models.diffusion.unclip import ImageEmbeddingConditionedLatentDiffusion, is_unclip_config
from tests.golden import released_manifest

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "sd21-unclip-l": "configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml",
    "sd21-unclip-h": "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml",
}


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    name = request.param
    return name, build_model_on_meta(REPO / CASES[name])


def test_keys_and_shapes_equal_released_file(built) -> None:
    name, model = built
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = {k: list(v) for k, v in released_manifest(name)["keys"].items()}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: s for k, s in ours.items() if ref[k] != s} == {}


def test_hyperparameters_of_released_file(built) -> None:
    name, model = built
    assert isinstance(model, ImageEmbeddingConditionedLatentDiffusion)
    assert model.parameterization == "v" and model.conditioning_key == "crossattn-adm"
    assert model.scale_factor == pytest.approx(0.18215) and model.image_size == 96
    unet = model.model.diffusion_model
    embedding = 768 if name.endswith("-l") else 1024
    assert model.embedding_dim == embedding
    assert unet.label_emb[0][0].in_features == 2 * embedding  # [noised embedding | level embedding]
    assert model.noise_augmentor.timestep_dim == embedding and model.max_noise_level == 1000
    assert model.needs_clip_stats == name.endswith("-l")
    # statistics come from outside the checkpoint: identity until --clip-stats sets them
    assert model.clip_stats_source is None
    assert float(model.noise_augmentor.data_mean.abs().sum()) == 0.0
    assert float((model.noise_augmentor.data_std - 1).abs().sum()) == 0.0


def test_parameter_counts_equal_released_file(built) -> None:
    name, model = built
    counts = released_manifest(name)["param_counts"]
    total = sum(p.numel() for p in model.parameters())
    assert total == counts["total"]
    assert sum(p.numel() for p in model.model.parameters()) == counts["model.diffusion_model (UNet)"]


def test_released_keys_are_recognised_as_unclip(built) -> None:
    name, _ = built
    keys = released_manifest(name)["keys"]
    assert identify(keys).family == "unclip"
    assert identify(keys).config == CASES[name]
    stripped = {k: v for k, v in keys.items() if not k.startswith(("embedder.", "noise_augmentor."))}
    # a copy saved without the embedder is still recognised, -L / -H from the ADM width
    assert identify(stripped).config == CASES[name]
    assert identify(released_manifest("v2-1_768-ema-pruned")["keys"]).family == "sd"
    assert identify(released_manifest("sd-v1-4")["keys"]).family == "sd"


def test_config_detection() -> None:
    from ldm.checkpoint import load_config

    for path in CASES.values():
        assert is_unclip_config(load_config(REPO / path))
    assert not is_unclip_config(load_config(REPO / "configs/stable-diffusion/v2-inference-v.yaml"))
    assert not is_unclip_config(load_config(REPO / "configs/stable-diffusion/v1-inference.yaml"))
