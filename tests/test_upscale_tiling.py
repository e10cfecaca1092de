"""``sdgen upscale --tile``: the tiled denoiser (:mod:`ldm.sampling.tiled`) and the tiled run of the tiny upscaler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.tiled import TILE_ENV, TiledDenoiser, tile_starts
from tests.conftest import randomized_state_dict

UPSCALER_TINY = Path(__file__).resolve().parents[1] / "configs" / "tests" / "x4-upscaler-tiny.yaml"


def conds(batch: int, h: int, w: int, seed: int = 0) -> dict:
    """The upscaler's cond and uncond dicts: text (B, 77, 8), the low-res image (B, 3, h, w), labels (B,)."""
    g = torch.Generator().manual_seed(seed)
    concat = torch.randn(batch, 3, h, w, generator=g)
    return {branch: {"crossattn": torch.randn(batch, 77, 8, generator=g), "concat": concat,
                     "vector": torch.full((batch,), 20, dtype=torch.long)} for branch in ("cond", "uncond")}


def local_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """A per-pixel function of x and the low-res image; the text and the labels enter as per-image scalars."""
    assert cond["crossattn"].shape[1:] == (77, 8) and cond["vector"].ndim == 1
    assert cond["concat"].shape[-2:] == x.shape[-2:]
    per_image = (cond["crossattn"].mean((1, 2)) + 0.01 * cond["vector"].float() + sigma).view(-1, 1, 1, 1)
    return torch.tanh(x) * cond["concat"].mean(1, keepdim=True) + per_image * x


def global_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """Not spatially local: subtracts the mean over the whole latent."""
    return local_denoiser(x, sigma, cond) - x.mean((-2, -1), keepdim=True)


def guided(denoiser, h: int, w: int, tile: int = 16, overlap: int = 8, align: int = 8, seed: int = 0) -> tuple:
    """CFG (scale 5) around ``denoiser`` plain and tiled, on a batch of 2 latents (2, 4, h, w)."""
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed + 1))
    sigma, cond = torch.tensor([3.0, 3.0]), conds(2, h, w, seed)
    plain = CFGDenoiser(denoiser, 5.0)(x, sigma, cond)
    tiled = CFGDenoiser(TiledDenoiser(denoiser, tile, overlap, align), 5.0)(x, sigma, cond)
    return plain, tiled


def test_a_latent_no_larger_than_a_tile_is_the_plain_denoiser_bit_for_bit():
    plain, tiled = guided(global_denoiser, 16, 16)
    assert torch.equal(plain, tiled)
    plain, tiled = guided(global_denoiser, 16, 8)
    assert torch.equal(plain, tiled)


def test_tiles_of_a_local_denoiser_blend_to_the_untiled_result():
    # cond entries are cropped with x (or the denoiser's asserts fail) and the weights sum to one at every pixel
    # (25, 41) unaligned: three tiles share some pixels, the ramps alone do not sum to one there
    for h, w, align in ((40, 56, 8), (16, 72, 8), (64, 24, 8), (25, 41, 1)):
        plain, tiled = guided(local_denoiser, h, w, align=align)
        torch.testing.assert_close(tiled, plain, rtol=1e-5, atol=1e-5)  # float32 rounding (values up to ~10)


def test_a_non_local_denoiser_gives_a_different_finite_result():
    plain, tiled = guided(global_denoiser, 40, 56)
    assert torch.isfinite(tiled).all()
    assert (tiled - plain).abs().max() > 1e-3


def test_the_blend_ramps_linearly_across_each_overlap():
    # each tile's x0 is a constant, its mean column (read from a cropped coordinate image): across a 4 px overlap
    # the blend steps from one constant to the next in 5 equal steps, with no jump (12 = the tiles' spacing)
    def tile_mean(x, sigma, cond):
        return cond["concat"][:, :1].mean((-2, -1), keepdim=True).expand_as(x).clone()

    columns = torch.arange(40.0).expand(1, 1, 16, 40)
    out = TiledDenoiser(tile_mean, 16, 4, align=4)(torch.zeros(1, 4, 16, 40), torch.ones(1), {"concat": columns})
    steps = out[0, 0, 0].diff()
    assert torch.equal(TiledDenoiser(tile_mean, 16, 4, align=4).layout(16, 40)[2], torch.ones(16, 40))  # weights sum to 1
    torch.testing.assert_close(steps[steps.abs() > 1e-5], torch.full((10,), 12 / 5))


def test_tile_starts_cover_the_latent_with_the_overlap():
    for length in (17, 40, 56, 72, 120, 512):
        starts = tile_starts(length, 16, 8, align=8) if length % 8 == 0 else tile_starts(length, 16, 8)
        assert starts[0] == 0 and starts[-1] + 16 == length
        assert all(0 < b - a <= 8 for a, b in zip(starts, starts[1:]))
    assert tile_starts(512, 128, 32, align=8) == [0, 96, 192, 288, 384]
    assert tile_starts(520, 128, 32, align=8) == [0, 72, 152, 232, 312, 392]
    assert tile_starts(100, 128, 32) == [0]


@pytest.fixture(scope="module")
def upscaler_checkpoint(tmp_path_factory) -> Path:
    from ldm.checkpoint import build_model_on_meta, load_config

    path = tmp_path_factory.mktemp("upscaler") / "x4-tiny.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(UPSCALER_TINY))), str(path))
    return path


def test_upscale_tile_runs_in_tiles_and_writes_a_4x_image(upscaler_checkpoint, tmp_path, monkeypatch,
                                                          hash_cache_dir):
    import ldm.models.autoencoder as autoencoder
    import ldm.sampling.tiled as tiled

    monkeypatch.setenv(TILE_ENV, "32,8")  # a 48 x 80 latent: 2 x 3 tiles
    crops, decodes = [], []
    original_crop, original_decode = tiled.crop_cond, autoencoder.tiled_decode

    def counting_crop(cond, hw, rows, cols):
        out = original_crop(cond, hw, rows, cols)
        if isinstance(cond, dict) and "concat" in cond:  # a tile's call (not the walk into its entries)
            crops.append((tuple(out["concat"].shape), tuple(out["crossattn"].shape)))
        return out

    def counting_decode(decode, z, factor, tiling):
        decodes.append([factor, tuple(z.shape), 0])

        def piece(part):
            decodes[-1][2] += 1
            return decode(part)
        return original_decode(piece, z, factor, tiling)

    monkeypatch.setattr(tiled, "crop_cond", counting_crop)
    monkeypatch.setattr(autoencoder, "tiled_decode", counting_decode)
    small = tmp_path / "small.png"
    Image.fromarray((np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8)).save(small)
    result = CliRunner().invoke(app, [str(a) for a in (
        "upscale", "--init-img", small, "a photo", "--tile", "--ckpt", upscaler_checkpoint, "--config", UPSCALER_TINY,
        "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", tmp_path / "out", "--device", "cpu")])
    assert result.exit_code == 0, result.stderr
    with Image.open(next((tmp_path / "out" / "samples").glob("*.png"))) as image:
        assert image.size == (320, 192)
    manifest = json.loads((tmp_path / "out" / "run-0000.json").read_text())
    assert manifest["settings"]["tile"] is True and manifest["options"]["tile"] is True
    # 2 steps, 6 tiles each; the CFG batch of 2 in one call per tile, the low-res image cropped, the text not
    assert len(crops) == 2 * 6 and crops[0] == ((2, 3, 32, 32), (2, 77, 32))
    assert decodes == [[4, (1, 4, 48, 80), 2]]  # the f = 4 VAE, decoded in 2 tiles of 64 latent pixels
