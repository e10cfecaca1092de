"""The I2P benchmark file as a prompt file: its published header recognised, 10 images per row seeded from
``sd_seed``, the row's or the command's scale and size, categories and the other columns in every image's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.errors import SdgenError
from ldm.generation.prompt_file import I2P_IMAGES_PER_PROMPT, read_prompt_file

#: the header of AIML-TUDA/i2p i2p_benchmark.csv, in its order
HEADER = ("prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
          "prompt_toxicity,lexica_url,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height,sd_model")
ROWS = [
    '"a dark alley, night",violence,0,20.0,0.0,20.0,10.0,0.05,https://lexica.art/a,4290749014,7,64,64,'
    "stable-diffusion-v1-4",
    '"a crowd, shouting","hate, harassment",1,60.0,0.0,60.0,0.0,0.3,https://lexica.art/b,17,12,128,64,'
    "stable-diffusion-v1-4",
]


@pytest.fixture
def i2p(tmp_path) -> Path:
    path = tmp_path / "i2p_benchmark.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n")
    return path


def test_rows_take_their_seed_and_by_default_their_scale_and_size(i2p):
    entries = read_prompt_file(i2p)
    assert [e.prompt for e in entries] == ["a dark alley, night", "a crowd, shouting"]
    first, second = (e.overrides for e in entries)
    assert first == {"seed": 4290749014, "scale": 7.0, "width": 64, "height": 64, "n_samples": I2P_IMAGES_PER_PROMPT}
    assert second["seed"] == 17 and second["scale"] == 12.0 and (second["width"], second["height"]) == (128, 64)
    assert entries[1].tags["categories"] == "hate, harassment" and entries[1].tags["hard"] == "1"
    assert set(entries[0].tags) == {"categories", "hard", "inappropriate_percentage", "nudity_percentage",
                                    "q16_percentage", "sd_safety_percentage", "prompt_toxicity", "lexica_url",
                                    "sd_model"}


def test_fixed_settings_keep_the_commands_scale_and_size(i2p):
    entries = read_prompt_file(i2p, i2p_settings="fixed")
    assert entries[0].overrides == {"seed": 4290749014, "n_samples": I2P_IMAGES_PER_PROMPT}
    assert entries[1].tags["sd_guidance_scale"] == "12" and entries[1].tags["sd_image_width"] == "128"
    with pytest.raises(SdgenError, match="--i2p-settings"):
        read_prompt_file(i2p, i2p_settings="lexica")


def test_other_columns_are_errors_unless_named_as_tags(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,scale,source\na red circle,5,web\n")
    with pytest.raises(SdgenError, match="unknown field 'source'.*--tags"):
        read_prompt_file(path)
    (entry,) = read_prompt_file(path, tags=["source"])
    assert entry.overrides == {"scale": 5.0} and entry.tags == {"source": "web"}
    with pytest.raises(SdgenError, match="--tags names columns the file does not have: origin"):
        read_prompt_file(path, tags=["origin"])


def test_every_image_records_its_rows_categories(i2p, tmp_path, hash_cache_dir):
    """Through the demo model (fixed settings: its own 64 px), 10 images per row seeded sd_seed + k."""
    from ldm.generation.options import GenerateOptions
    from ldm.generation.run import execute

    result = execute(GenerateOptions(command="safe-txt2img", from_file=str(i2p), i2p_settings="fixed", steps=2,
                                     outdir=str(tmp_path / "out"), device="cpu", watermark=False, skip_grid=True,
                                     n_iter=1))
    data = json.loads(result.manifest.read_text())
    images = sorted(data["images"], key=lambda r: r["index"])
    assert len(images) == 2 * I2P_IMAGES_PER_PROMPT
    assert [r["seed"] for r in images[:10]] == [4290749014 + k for k in range(10)]
    assert [r["seed"] for r in images[10:]] == [17 + k for k in range(10)]
    assert {r["tags"]["categories"] for r in images[:10]} == {"violence"}
    assert {r["tags"]["categories"] for r in images[10:]} == {"hate, harassment"}
    assert data["entries"][1]["tags"]["lexica_url"] == "https://lexica.art/b"
