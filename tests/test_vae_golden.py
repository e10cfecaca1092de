"""The SD1 VAE against golden outputs of the original code (tiny model, tests/data/golden/README.md 1(g))."""

from __future__ import annotations

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.util import instantiate_from_config
from tests.golden import case_config, case_data, case_state_dict, sub_state_dict
from tests.tolerance import NETWORK_FLOAT32, assert_matches_recorded

# Max |error| reached (CPU, float32): ~3e-8 absolute on values of magnitude ~0.15.
SCALE_FACTOR = 0.18215


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    model = instantiate_from_config(case_config("sd1").model.params.first_stage_config)
    assert isinstance(model, AutoencoderKL)
    model.load_state_dict(sub_state_dict(case_state_dict("sd1"), "first_stage_model."), strict=True)
    return model.eval()


def test_no_loss_parameters(vae: AutoencoderKL) -> None:
    prefixes = {k.split(".")[0] for k in vae.state_dict()}
    assert prefixes == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_encode_matches_reference(vae: AutoencoderKL) -> None:
    data = case_data("sd1")
    with torch.no_grad():
        posterior = vae.encode(data["vae.encode_in"])
    assert_matches_recorded(posterior.mean, data["vae.encode_mean"], NETWORK_FLOAT32, "mean")
    assert_matches_recorded(posterior.logvar, data["vae.encode_logvar"], NETWORK_FLOAT32, "logvar")
    assert_matches_recorded(SCALE_FACTOR * posterior.mode(), data["vae.encode_out"], NETWORK_FLOAT32, "latent")


def test_decode_matches_reference(vae: AutoencoderKL) -> None:
    data = case_data("sd1")
    with torch.no_grad():
        out = vae.decode(data["vae.decode_in"] / SCALE_FACTOR)
    assert out.shape == (1, 3, 32, 32)
    assert_matches_recorded(out, data["vae.decode_out"], NETWORK_FLOAT32)


def test_sample_is_reproducible_and_noisy(vae: AutoencoderKL) -> None:
    data = case_data("sd1")
    with torch.no_grad():
        posterior = vae.encode(data["vae.encode_in"])
    a = posterior.sample(generator=torch.Generator().manual_seed(3))
    b = posterior.sample(generator=torch.Generator().manual_seed(3))
    c = posterior.sample(generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, posterior.mean + posterior.std * noise)
