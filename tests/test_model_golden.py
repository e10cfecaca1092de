"""LatentDiffusion against the golden vectors of the original code (tiny models, tests/data/golden).

The golden weights go through the real loading path (load_model / assign_state_dict) with the tiny configs
under configs/tests, which are the golden reference yamls without their training settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_model
from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS, LatentDiffusion
from ldm.util import instantiate_from_config
from tests.golden import GOLDEN, case_config, case_data, case_state_dict
from tests.tolerance import IEEE_EXACT, NETWORK_FLOAT32, assert_matches_recorded

REPO = Path(__file__).resolve().parent.parent
SD1_TINY = REPO / "configs" / "tests" / "sd1-tiny.yaml"
SD2V_TINY = REPO / "configs" / "tests" / "sd2v-tiny.yaml"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Against golden data made on another CPU."""
    assert_matches_recorded(actual, expected, NETWORK_FLOAT32)


@pytest.fixture(scope="module")
def sd1() -> LatentDiffusion:
    return load_model(SD1_TINY, GOLDEN / "sd1.weights.safetensors")


def test_sd1_unet_output(sd1):
    d = case_data("sd1")
    with torch.no_grad():
        eps = sd1.apply_model(d["unet.x"], d["unet.t"], {"crossattn": d["unet.context"]})
    assert sd1.parameterization == "eps"
    close(eps, d["unet.out"])
    # the original's dict keys (lists of tensors) route the same way
    with torch.no_grad():
        legacy = sd1.apply_model(d["unet.x"], d["unet.t"], {"c_crossattn": [d["unet.context"]]})
    assert torch.equal(legacy, eps)


def test_sd1_first_stage(sd1):
    d = case_data("sd1")
    # a Python float as in the original (scale_by_std off), so no state_dict key
    assert isinstance(sd1.scale_factor, float) and sd1.scale_factor == 0.18215
    assert_matches_recorded(torch.tensor([sd1.scale_factor]), d["scale_factor"], IEEE_EXACT)
    with torch.no_grad():
        close(sd1.decode_first_stage(d["vae.decode_in"]), d["vae.decode_out"])
        posterior = sd1.encode_first_stage(d["vae.encode_in"])
        close(posterior.mean, d["vae.encode_mean"])
        close(posterior.logvar, d["vae.encode_logvar"])
        close(sd1.get_first_stage_encoding(posterior.mode()), d["vae.encode_out"])
        # sampling the posterior: scale_factor * (mean + std * noise), reproducible with a generator
        a = sd1.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(3))
        b = sd1.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    noise = (a / sd1.scale_factor - posterior.mean) / posterior.std
    assert 0.5 < noise.std().item() < 1.5


def test_schedule_computed_bit_for_bit():
    """Our float64 schedule computation reproduces the original float32 buffers exactly (not loaded here)."""
    model = build_model_on_meta(SD1_TINY)
    stored = case_state_dict("sd1")
    d = case_data("sd1")
    assert_matches_recorded(model.alphas_cumprod, d["alphas_cumprod"], IEEE_EXACT)
    for name in SCHEDULE_BUFFERS:
        buf = getattr(model, name)
        assert buf.dtype == torch.float32
        assert_matches_recorded(buf, stored[name], IEEE_EXACT, name)
    assert model.num_timesteps == 1000
    assert torch.isfinite(model.lvlb_weights).all() and model.lvlb_weights[0] == model.lvlb_weights[1]


def test_sd2v_unet_output_is_v():
    model = build_model_on_meta(SD2V_TINY)
    assign_state_dict(model, dict(case_state_dict("sd2v")), source="sd2v golden")
    d = case_data("sd2v")
    with torch.no_grad():
        v = model.apply_model(d["unet.x"], d["unet.t"], {"crossattn": d["unet.context"]})
    assert model.parameterization == "v"
    close(v, d["unet.out"])
    assert_matches_recorded(model.alphas_cumprod, d["alphas_cumprod"], IEEE_EXACT)


@pytest.mark.parametrize("case", ["sd1", "sd2v"])
def test_reference_yamls_with_training_settings_instantiate(case):
    """The golden yamls are the originals (monitor, use_ema, scheduler_config, ...) and must still build."""
    cfg = case_config(case)
    params = cfg.model.params.cond_stage_config.params
    sizes = cfg.golden_tiny_encoder_sizes
    if case == "sd1":
        params.text_config = sizes.hf_clip_text
    else:
        params.model_cfg = sizes.openclip_overrides["ViT-H-14"]
    model = build_model_on_meta(cfg)
    assert model.training_params["monitor"] == "val/loss_simple_ema"
    assert model.cond_stage_key == "txt" and model.first_stage_key == "jpg"
    ours = build_model_on_meta(SD1_TINY if case == "sd1" else SD2V_TINY).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ours.items()}


def test_get_learned_conditioning(sd1):
    with torch.no_grad():
        c = sd1.get_learned_conditioning(["a photo of a cat", ""])
        direct = sd1.cond_stage_model(["a photo of a cat", ""])
    assert c.shape == (2, 77, 32)
    assert torch.equal(c, direct)


def test_frozen_stages_stay_in_eval(sd1):
    sd1.train()
    try:
        assert sd1.model.training
        assert not sd1.first_stage_model.training and not sd1.cond_stage_model.training
    finally:
        sd1.eval()


def test_unknown_parameter_is_an_error():
    cfg = case_config("sd1")
    cfg.model.params.not_a_parameter = 1
    with pytest.raises(SdgenError, match="not_a_parameter"):
        build_model_on_meta(cfg)


# ---- conditioning routing (DiffusionWrapper), with a network that records its inputs ----------------------


class RecordingUNet(nn.Module):
    """Returns its input x and remembers the context / y it was given."""

    def __init__(self, **_: object) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.seen: dict = {}

    def forward(self, x, timesteps, context=None, y=None):
        self.seen = {"x": x, "t": timesteps, "context": context, "y": y}
        return x * self.weight


def _model(conditioning_key: str) -> LatentDiffusion:
    return instantiate_from_config({
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "conditioning_key": conditioning_key,
            "unet_config": {"target": "tests.test_model_golden.RecordingUNet"},
            "first_stage_config": {"target": "torch.nn.Identity"},
            "cond_stage_config": "__is_first_stage__",
            "linear_start": 0.00085, "linear_end": 0.012,
        },
    })


def test_routing_crossattn_adm():
    model = _model("crossattn-adm")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 1])
    ctx_a, ctx_b, vec = torch.randn(2, 5, 3), torch.randn(2, 7, 3), torch.randn(2, 6)
    out = model.apply_model(x, t, {"crossattn": [ctx_a, ctx_b], "vector": vec})
    seen = model.model.diffusion_model.seen
    assert torch.equal(out, x) and torch.equal(seen["t"], t)
    assert torch.equal(seen["context"], torch.cat([ctx_a, ctx_b], dim=1)) and torch.equal(seen["y"], vec)
    with pytest.raises(SdgenError, match="vector"):
        model.apply_model(x, t, {"crossattn": ctx_a})


def test_routing_hybrid_and_concat():
    x, t, img, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 8, 8), torch.randn(1, 3, 2)
    hybrid = _model("hybrid")
    out = hybrid.apply_model(x, t, {"concat": img, "crossattn": ctx})
    assert torch.equal(out, torch.cat([x, img], dim=1))
    assert torch.equal(hybrid.model.diffusion_model.seen["context"], ctx)
    concat = _model("concat")
    out = concat.apply_model(x, t, img)  # a bare tensor is the concat conditioning of a concat model
    assert torch.equal(out, torch.cat([x, img], dim=1)) and concat.model.diffusion_model.seen["context"] is None


def test_routing_adm_only_and_dtype():
    model = _model("adm")
    model.to(torch.float64)
    x, vec = torch.randn(1, 4, 8, 8), torch.randn(1, 6)
    out = model.apply_model(x, torch.tensor([3]), {"vector": vec})
    seen = model.model.diffusion_model.seen
    assert seen["context"] is None and torch.equal(seen["y"], vec.double())
    assert seen["x"].dtype == torch.float64 and out.dtype == torch.float32
