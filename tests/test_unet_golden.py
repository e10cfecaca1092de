"""The UNet against golden outputs of the original code (tiny models, tests/data/golden/README.md).

Each case builds UNetModel from the reference yaml's unet_config (SGM: network_config), loads the golden
weights strictly and compares one batch-2 forward pass (t = [999, 1]) with ``unet.out``.
"""

from __future__ import annotations

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config
from tests.golden import case_config, case_data, case_state_dict, sub_state_dict
from tests.tolerance import NETWORK_FLOAT32, assert_matches_recorded

# Max |error| reached (CPU, float32): ~1e-7 absolute on outputs of magnitude ~0.1 (relative ~1e-6).


def _unet_config(case: str):
    params = case_config(case).model.params
    return params.unet_config if "unet_config" in params else params.network_config


def _inputs(case: str) -> dict[str, torch.Tensor]:
    data = case_data(case)
    if case == "unclip-l":
        # README 3(b): context c for both rows, ADM vector of noise level 100 for both rows.
        adm = data["noise_aug.level100.adm"]
        return {"context": torch.cat([data["c"], data["c"]]), "y": torch.cat([adm, adm])}
    if case.startswith("sdxl"):
        return {"context": data["unet.context"], "y": data["unet.y"]}
    return {"context": data["unet.context"]}


@pytest.mark.parametrize("case", ["sd1", "sd2v", "unclip-l", "sdxl-base", "sdxl-refiner"])
def test_unet_matches_reference(case: str) -> None:
    unet = instantiate_from_config(_unet_config(case))
    assert isinstance(unet, UNetModel)
    unet.load_state_dict(sub_state_dict(case_state_dict(case), "model.diffusion_model."), strict=True)
    unet.eval()
    data = case_data(case)
    with torch.no_grad():
        out = unet(data["unet.x"], data["unet.t"], **_inputs(case))
    assert_matches_recorded(out, data["unet.out"], NETWORK_FLOAT32, case)


def test_unet_output_depends_on_every_input() -> None:
    """Guards the golden test against a degenerate pass: timesteps, context and ADM vector all matter."""
    case = "unclip-l"
    unet = instantiate_from_config(_unet_config(case)).eval()
    unet.load_state_dict(sub_state_dict(case_state_dict(case), "model.diffusion_model."), strict=True)
    data = case_data(case)
    inputs = _inputs(case)
    with torch.no_grad():
        out = unet(data["unet.x"], data["unet.t"], **inputs)
        swapped_t = unet(data["unet.x"], data["unet.t"].flip(0), **inputs)
        zero_ctx = unet(data["unet.x"], data["unet.t"], context=torch.zeros_like(inputs["context"]), y=inputs["y"])
        zero_y = unet(data["unet.x"], data["unet.t"], context=inputs["context"], y=torch.zeros_like(inputs["y"]))
    for other in (swapped_t, zero_ctx, zero_y):
        assert (other - out).abs().max() > 1e-4
