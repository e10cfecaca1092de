"""``--engine openvino`` on the tiny models: agreement with the torch engine for every family, the on-disk cache
(reuse, a corrupt entry rebuilt), precision choices and the missing-extra error.

The tiny networks are converted once per test session (a shared cache folder); a conversion takes seconds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoint import load_config
from ldm.errors import SdgenError
from ldm.output import png_pixels, read_parameters
from tests.conftest import randomized_state_dict
from tests.tolerance import Tolerance, assert_matches_recorded

pytest.importorskip("openvino")  # the test extra installs it; the missing-extra test below fakes its absence

from ldm.engines.ov_engine import apply_openvino, cache_root, cpu_capabilities, inference_precision  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tests"
# OpenVINO's f32 kernels sum in other orders than oneDNN's: measured up to 2e-6 of the output's largest value on
# the tiny UNets (AMD EPYC, AVX2); float32 accuracy of a few dozen layers, with a margin
OV_F32 = Tolerance(why="OpenVINO f32 vs torch float32 kernels (other summation orders), tiny networks", rel_max=2e-5)


@pytest.fixture(scope="module", autouse=True)
def ov_cache(tmp_path_factory):
    """One cache folder for the module's conversions (each tiny network is converted once)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("openvino-cache")
        patch.setenv("SDGEN_OPENVINO_CACHE", str(folder))
        yield folder


@pytest.mark.parametrize("name", ["sd2v-tiny", "unclip-l-tiny", "sdxl-base-tiny", "sdxl-refiner-tiny",
                                  "x4-upscaler-tiny"])
def test_unet_agrees_with_torch_for_every_family(name):
    """Each family's UNet through the engine with the inputs its denoiser gives it: v-prediction (SD 2.x), ADM
    vectors (unCLIP, SDXL base and refiner), integer class labels and concatenated channels (the x4 upscaler)."""
    from types import SimpleNamespace

    from ldm.util import instantiate_from_config

    params = load_config(TINY / f"{name}.yaml").model.params
    config = params.get("unet_config") or params.get("network_config")
    unet = instantiate_from_config(config).eval()
    unet.load_state_dict(randomized_state_dict(unet, seed=1))
    g = torch.Generator().manual_seed(0)
    context_dim = config.params.context_dim
    context_dim = int(context_dim[0] if not isinstance(context_dim, int) else context_dim)  # SDXL: one per level
    x = torch.randn(2, int(config.params.in_channels), 8, 8, generator=g)
    t, context, y = torch.tensor([999, 21]), torch.randn(2, 77, context_dim, generator=g), None
    if unet.num_classes == "sequential":
        y = torch.randn(2, int(config.params.adm_in_channels), generator=g)
    elif unet.num_classes is not None:
        y = torch.tensor([20, 300])
    holder = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    with torch.no_grad():
        expected = unet(x, t, context=context, y=y)
        apply_openvino(holder, "full", [f"tiny {name}"])
        got = holder.model.diffusion_model(x, t, context=context, y=y)
    assert type(holder.model.diffusion_model).__name__ == "OpenVINOUNet"
    assert_matches_recorded(got, expected, OV_F32)


def test_text_towers_agree_with_torch_for_every_encoder_batch_and_clip_skip():
    """The text towers through the engine: transformers' CLIP (SDXL's hidden layer and pooled row; SD 1.x's last
    layer runs in the image test below), OpenCLIP as SD 2.x (ln_final) and as SDXL (penultimate, pooled), for a
    batch of 2 (the traced shape) and 1 and clip skip 1 and 2 from one converted network each; the torch blocks
    are dropped once converted."""
    from ldm.modules.encoders.modules import TextEncoder
    from ldm.util import instantiate_from_config

    containers = []
    for name, key in [("sd2v-tiny", "cond_stage_config"),
                      ("sdxl-base-tiny", "conditioner_config")]:
        module = instantiate_from_config(load_config(TINY / f"{name}.yaml").model.params[key]).eval()
        module.load_state_dict(randomized_state_dict(module, seed=3))
        containers.append(module)
    encoders = [m for c in containers for m in c.modules() if isinstance(m, TextEncoder)]
    g = torch.Generator().manual_seed(0)
    ids = {}
    for n in (2, 1):
        ids[n] = torch.randint(1, 49000, (n, 77), generator=g)
        ids[n][:, 0], ids[n][torch.arange(n), 9 + torch.arange(n)] = 49406, 49407
    with torch.no_grad():
        expected = {(i, n, skip): e.encode_ids(ids[n], skip) for i, e in enumerate(encoders) for n in ids
                    for skip in (1, 2)}
        apply_openvino(torch.nn.ModuleList(containers), "full", ["tiny text towers"])
        for (i, n, skip), (z, pooled) in expected.items():
            got_z, got_pooled = encoders[i].encode_ids(ids[n], skip)
            assert_matches_recorded(got_z, z, OV_F32)
            assert (got_pooled is None) == (pooled is None)
            if pooled is not None:
                assert_matches_recorded(got_pooled, pooled, OV_F32)
    assert [type(e).__name__ for e in encoders] == ["FrozenOpenCLIPEmbedder", "FrozenCLIPEmbedder",
                                                    "FrozenOpenCLIPEmbedder2"]
    assert len(encoders[1].transformer.text_model.encoder.layers) == len(encoders[2].model.transformer.resblocks) == 0


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory, tiny_checkpoint, tiny_config):
    """The session's tiny SD 1.x checkpoint (tests/conftest.py), an output folder and its config."""
    root = tmp_path_factory.mktemp("ov-sd1")
    return {"root": root, "ckpt": tiny_checkpoint, "config": tiny_config}


def _run(sdgen_main, files: dict, out: str, *extra) -> list[np.ndarray]:
    root = files["root"]
    code, _, err = sdgen_main(["safe-txt2img", "a red cube", "--config", files["config"], "--ckpt",
                               files["ckpt"], "--H", 32, "--W", 32, "--steps", 4, "--n_samples", 2,
                               "--n_iter", 1, "--sld", "max", "--device", "cpu", "--outdir", root / out, *extra])
    assert code == 0, err
    return [png_pixels(p) for p in sorted((root / out / "samples").glob("*.png"))]


def test_images_cache_reuse_records_and_a_corrupt_entry(sdgen_main, sd1_files, caplog):
    """SD 1.x with SLD end to end: the engine's images within a level of torch's; a second run converts nothing
    and gives the same pixels bit for bit; a truncated entry is converted again, not a crash."""
    torch_images = _run(sdgen_main, sd1_files, "torch")
    before = set(cache_root().iterdir())
    first = _run(sdgen_main, sd1_files, "ov1", "--engine", "openvino")
    for a, b in zip(torch_images, first):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.02
    params = read_parameters(sd1_files["root"] / "ov1" / "samples" / "00000.png")
    assert params["Engine"].startswith("openvino ")
    manifest = json.loads((sd1_files["root"] / "ov1" / "run-0000.json").read_text())
    assert manifest["engine"] == "openvino" and manifest["options"]["engine"] == "openvino"
    assert manifest["settings"]["engine"] == "openvino"

    entries = sorted(p for p in set(cache_root().iterdir()) - before if (p / "entry.json").is_file())
    assert len(entries) == 3  # the UNet, the VAE decoder (txt2img encodes no image) and the text tower
    with caplog.at_level(logging.INFO, logger="ldm.engines.ov_engine"):
        again = _run(sdgen_main, sd1_files, "ov2", "--engine", "openvino")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert "reusing the converted network" in caplog.text and "converting" not in caplog.text

    weights = min((p / "model.bin" for p in entries), key=lambda p: p.stat().st_size)  # the VAE decoder's
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.engines.ov_engine"):
        rebuilt = _run(sdgen_main, sd1_files, "ov3", "--engine", "openvino")
    assert "incomplete or corrupt" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(first, rebuilt))


def test_precision_choices():
    assert inference_precision("full") == inference_precision("autocast") == "f32"
    if "BF16" in cpu_capabilities():
        assert inference_precision("bf16") == "bf16"
    else:
        with pytest.raises(SdgenError, match="needs a CPU that computes bfloat16"):
            inference_precision("bf16")
    with pytest.raises(SdgenError, match="not fp16"):
        inference_precision("fp16")


def test_missing_extra_is_one_line_exit_2(sdgen_main, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    code, _, err = sdgen_main(["txt2img", "x", "--engine", "openvino", "--outdir", tmp_path, "--steps", 2])
    assert code == 2 and err.strip().splitlines() == [
        'sdgen: error: --engine openvino needs the openvino extra: pip install "sdgen[openvino]"']
    code, _, err = sdgen_main(["txt2img", "x", "--engine", "tensorrt", "--outdir", tmp_path])
    assert code == 2 and "unknown --engine 'tensorrt'" in err
