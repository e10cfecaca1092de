"""The config picked from the checkpoint, A1111's PNG parameters as sdgen writes them, and ``sdgen replay
IMAGE.png`` for PNGs of sdgen and of AUTOMATIC1111."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.config_choice import V_STATISTIC_KEY, choose_config
from ldm.errors import SdgenError
from ldm.generation.png_replay import options_from_png, sampler_and_schedule
from ldm.model_files import (
    CONFIG_SD1,
    CONFIG_SD2,
    CONFIG_SD2V,
    CONFIG_SDXL_BASE,
    CONFIG_SDXL_REFINER,
    CONFIG_UNCLIP_H,
    CONFIG_UNCLIP_L,
    file_sha256,
)
from ldm.output import parse_parameters, png_pixels
from tests.test_checkpoint import released_manifest


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def key_file(path: Path, manifest: str, std: float | None = None, metadata: dict | None = None) -> Path:
    """A safetensors file with the released file's keys (1-element tensors: only keys decide the family) and,
    for SD 2.x, the v-prediction statistic tensor drawn with ``std``."""
    keys = released_manifest(manifest)["keys"]
    tensors = {k: torch.zeros(1) for k in keys}
    if std is not None:
        tensors[V_STATISTIC_KEY] = torch.randn(320, generator=torch.Generator().manual_seed(0)) * std
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("manifest, expected", [
    ("sd-v1-4", CONFIG_SD1), ("sd21-unclip-l", CONFIG_UNCLIP_L), ("sd21-unclip-h", CONFIG_UNCLIP_H),
    ("sd_xl_base_0.9", CONFIG_SDXL_BASE), ("sd_xl_refiner_0.9", CONFIG_SDXL_REFINER),
])
def test_the_config_of_each_released_layout(manifest, expected, tmp_path):
    choice = choose_config(key_file(tmp_path / f"{manifest}.safetensors", manifest))
    assert choice.path.as_posix().endswith(expected)


def test_sd2_epsilon_or_v_from_metadata_statistic_or_a_yaml_beside(tmp_path):
    v = choose_config(key_file(tmp_path / "a.safetensors", "v2-1_768-ema-pruned", std=0.2))
    assert v.path.as_posix().endswith(CONFIG_SD2V) and "> 0.09" in v.reason
    eps = choose_config(key_file(tmp_path / "b.safetensors", "v2-1_768-ema-pruned", std=0.02))
    assert eps.path.as_posix().endswith(CONFIG_SD2) and "<= 0.09" in eps.reason
    told = choose_config(key_file(tmp_path / "c.safetensors", "v2-1_768-ema-pruned", std=0.2,
                                  metadata={"modelspec.prediction_type": "epsilon"}))
    assert told.path.as_posix().endswith(CONFIG_SD2) and "metadata" in told.reason
    beside = tmp_path / "c.yaml"
    beside.write_text("model: {}\n")
    assert choose_config(tmp_path / "c.safetensors").path == beside.resolve()
    with pytest.raises(SdgenError, match="cannot tell which model"):
        save_file({"foo": torch.zeros(1)}, str(tmp_path / "d.safetensors"))
        choose_config(tmp_path / "d.safetensors")


def test_a_tiny_checkpoint_without_config_uses_the_yaml_beside_it(tiny_checkpoint, tiny_config, tmp_path, caplog):
    ckpt = tmp_path / "mine.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    shutil.copy(tiny_config, tmp_path / "mine.yaml")
    result = invoke("txt2img", "a cube", "--ckpt", ckpt, "--H", "16", "--W", "16", "--steps", "2", "--n_samples",
                    "1", "--n_iter", "1", "--outdir", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "config mine.yaml (mine.yaml beside the checkpoint)" in caplog.text


# ----------------------------------------------------------------------------- PNG parameters


def test_a1111_sampler_names_with_and_without_a_schedule_suffix():
    assert sampler_and_schedule("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert sampler_and_schedule("DPM++ 2M SDE") == ("dpmpp_2m_sde", "default")
    assert sampler_and_schedule("Euler a") == ("euler_ancestral", "default")
    assert sampler_and_schedule("DPM++ 3M SDE Exponential") == ("dpmpp_3m_sde", "exponential")
    with pytest.raises(SdgenError, match="not one sdgen has"):
        sampler_and_schedule("DDPM")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_checkpoint, tiny_config) -> Path:
    """A models folder: the tiny SD 1.x checkpoint with its config beside it."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_checkpoint, root / "tiny.safetensors")
    shutil.copy(tiny_config, root / "tiny.yaml")
    return root


def test_sdgen_png_parameters_use_a1111_keys_and_replay_to_the_same_pixels(models, tmp_path):
    first = tmp_path / "first"
    result = invoke("txt2img", "a red cube", "--ckpt", models / "tiny.safetensors", "--H", "16", "--W", "16",
                    "--steps", "4", "--n_samples", "2", "--n_iter", "1", "--outdir", first, "--device", "cpu",
                    "--sampler", "dpmpp_2m_sde", "--schedule", "karras", "--seed", "7")
    assert result.exit_code == 0, result.stderr
    second = sorted((first / "samples").glob("*.png"))[1]
    fields = parse_parameters(Image.open(second).text["parameters"])
    assert fields["Sampler"] == "DPM++ 2M SDE" and fields["Schedule type"] == "Karras"
    assert fields["Size"] == "16x16" and fields["Seed"] == "8"
    assert fields["Model hash"] == file_sha256(models / "tiny.safetensors")[:10]
    assert "Eta DDIM" not in fields and "Eta" not in fields and "Schedule" not in fields
    again = invoke("replay", second, "--models-dir", models, "--outdir", tmp_path / "again")
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(png_pixels(second), png_pixels(next((tmp_path / "again" / "samples").glob("*.png"))))
    ddim = invoke("txt2img", "a cube", "--ckpt", models / "tiny.safetensors", "--H", "16", "--W", "16", "--steps",
                  "4", "--n_samples", "1", "--n_iter", "1", "--outdir", tmp_path / "ddim", "--device", "cpu",
                  "--sampler", "ddim", "--ddim_eta", "0.5")
    assert ddim.exit_code == 0, ddim.stderr
    fields = parse_parameters(Image.open(next((tmp_path / "ddim" / "samples").glob("*.png"))).text["parameters"])
    assert fields["Eta DDIM"] == "0.5" and "Schedule type" not in fields


def a1111_png(path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def test_an_a1111_png_is_replayed_from_its_parameters(models, tmp_path):
    short = file_sha256(models / "tiny.safetensors")[:10]
    png = a1111_png(tmp_path / "00012-1234.png", (
        "a red (cube:1.2) on a table\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 16x16, Model hash: {short}, "
        "Model: tiny, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Version: v1.10.1"))
    opts, ignored = options_from_png(png, models_dir=str(models))
    assert (opts.sampler, opts.schedule, opts.steps, opts.scale, opts.seed) == ("dpmpp_2m", "karras", 4, 6.5, 1234)
    assert (opts.width, opts.height, opts.clip_skip, opts.negative_prompt) == (16, 16, 2, "blurry")
    assert ignored == ["Hires steps", "Hires upscale"]
    replayed = invoke("replay", png, "--models-dir", models, "--outdir", tmp_path / "replayed")
    assert replayed.exit_code == 0, replayed.stderr
    assert "ignoring fields sdgen does not act on: Hires steps, Hires upscale" in replayed.stderr
    direct = invoke("txt2img", "a red (cube:1.2) on a table", "--negative-prompt", "blurry", "--ckpt",
                    models / "tiny.safetensors", "--H", "16", "--W", "16", "--steps", "4", "--sampler", "dpmpp_2m",
                    "--schedule", "karras", "--scale", "6.5", "--seed", "1234", "--clip-skip", "2", "--n_samples",
                    "1", "--n_iter", "1", "--outdir", tmp_path / "direct", "--device", "cpu")
    assert direct.exit_code == 0, direct.stderr
    np.testing.assert_array_equal(png_pixels(next((tmp_path / "replayed" / "samples").glob("*.png"))),
                                  png_pixels(next((tmp_path / "direct" / "samples").glob("*.png"))))
    missing = a1111_png(tmp_path / "other.png", "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, "
                                                "Size: 16x16, Model hash: 0123456789")
    refused = invoke("replay", missing, "--models-dir", models)
    assert refused.exit_code == 2 and "no checkpoint with Model hash 0123456789" in refused.stderr


def test_schedules_other_than_default_are_refused_for_ddim(models, tmp_path):
    result = invoke("txt2img", "a cube", "--ckpt", models / "tiny.safetensors", "--sampler", "ddim", "--schedule",
                    "karras", "--outdir", tmp_path)
    assert result.exit_code == 2 and "only the default schedule" in result.stderr
    result = invoke("txt2img", "a cube", "--ckpt", models / "tiny.safetensors", "--schedule", "polynomial",
                    "--outdir", tmp_path)
    assert result.exit_code == 2 and "unknown --schedule" in result.stderr


def test_plms_with_few_steps_on_the_demo_model_warns(tmp_path, caplog):
    result = invoke("txt2img", "a red circle", "--plms", "--steps", "10", "--n_samples", "1", "--n_iter", "1",
                    "--outdir", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "PLMS with 10 steps on a v-prediction model" in caplog.text
