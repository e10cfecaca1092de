"""``sdgen replay`` of every generation command's manifest: the replay gives the recorded pixels, bit for bit.

Each case runs a command on a tiny model (CPU, 2 steps), replays its ``run-0000.json`` into another folder and
compares the samples; the replay also refuses a checkpoint whose hash differs from the recorded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.checkpoint import build_model_on_meta, load_config
from ldm.cli.app import app
from ldm.output import load_manifest, png_pixels
from tests.conftest import randomized_state_dict
from tests.sdxl_tiny import SIZE, TINY_CONFIGS, write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
UNCLIP_H_TINY = REPO / "configs" / "tests" / "unclip-h-tiny.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint, tiny_config) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replay")
    unclip = root / "unclip-h.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(UNCLIP_H_TINY)), seed=3), str(unclip))
    init = root / "init.png"
    # 64 px: unCLIP embeds its input at multiples of 64
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    return {
        "sd1": tiny_checkpoint, "sd1_config": tiny_config, "unclip": unclip, "unclip_config": UNCLIP_H_TINY,
        "base": write_tiny_checkpoint("base", root / "base.safetensors"),
        "refiner": write_tiny_checkpoint("refiner", root / "refiner.safetensors"),
        "base_config": TINY_CONFIGS["base"], "refiner_config": TINY_CONFIGS["refiner"], "init": init,
    }


SD1 = ["--ckpt", "{sd1}", "--config", "{sd1_config}", "--H", "16", "--W", "16"]
SDXL_SIZE = ["--H", str(SIZE), "--W", str(SIZE)]
CASES = {
    "txt2img": ["txt2img", "a red cube", *SD1, "--ddim_eta", "0.5", "--n_iter", "2"],
    "img2img": ["img2img", "a red cube", "--init-img", "{init}", "--strength", "1.0", "--ckpt", "{sd1}", "--config",
                "{sd1_config}", "--sampler", "euler_ancestral"],
    "safe-txt2img": ["safe-txt2img", "a red cube", *SD1, "--sld", "max", "--sld-guidance-scale", "3000"],
    "unclip-variate": ["unclip-variate", "--init-img", "{init}", "--ckpt", "{unclip}", "--config", "{unclip_config}",
                       "--noise-level", "300", "--H", "32", "--W", "32"],
    "sdxl-refine": ["sdxl-refine", "a lighthouse", "--ckpt", "{base}", "--refiner-ckpt", "{refiner}", "--config",
                    "{base_config}", "--refiner-config", "{refiner_config}", *SDXL_SIZE, "--high-noise-frac", "0.5",
                    "--s-churn", "1.0"],
    "sdxl-refine --init-img": ["sdxl-refine", "a lighthouse", "--init-img", "{init}", "--refiner-ckpt", "{refiner}",
                               "--refiner-config", "{refiner_config}", "--strength", "1.0"],
    "txt2img (SDXL)": ["txt2img", "a lighthouse", "--ckpt", "{base}", "--config", "{base_config}", *SDXL_SIZE,
                       "--sampler", "euler_ancestral"],
}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def samples(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


@pytest.mark.parametrize("case", list(CASES))
def test_replay_gives_the_recorded_pixels(case, files, tmp_path):
    args = [a.format(**files) for a in CASES[case]]
    first = tmp_path / "first"
    result = invoke(*args, "--steps", "2", "--n_samples", "2", "--device", "cpu", "--outdir", first)
    assert result.exit_code == 0, (result.stderr, result.exception)
    recorded = load_manifest(first / "run-0000.json")
    assert recorded["command"] == args[0] and recorded["status"] == "complete"

    again = tmp_path / "again"
    replayed = invoke("replay", first / "run-0000.json", "--outdir", again)
    assert replayed.exit_code == 0, (replayed.stderr, replayed.exception)
    original, copy = samples(first), samples(again)
    assert len(original) == len(copy) == len(recorded["seeds"]) >= 2
    for a, b in zip(original, copy):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(original[0], original[1])  # two seeds, two images
    manifest = load_manifest(again / "run-0000.json")
    assert manifest["command"] == recorded["command"] and manifest["seeds"] == recorded["seeds"]
    assert [i["sha256"] for i in manifest["images"]] == [i["sha256"] for i in recorded["images"]]

    tampered = dict(recorded, model={**recorded["model"], "checkpoint_sha256": "0" * 64})
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    refused = invoke("replay", tmp_path / "tampered.json", "--outdir", tmp_path / "x")
    assert refused.exit_code == 2 and "checkpoint differs" in refused.stderr, refused.stderr


def test_a_manifest_of_another_command_is_refused(tmp_path):
    manifest = {"format": "sdgen-run", "format_version": 1, "command": "train", "options": {}}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    result = invoke("replay", tmp_path / "run.json")
    assert result.exit_code == 2 and "cannot replay a 'train' run" in result.stderr
