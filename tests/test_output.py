"""Output files: PNG parameters (A1111 format), grid geometry, numbering, run manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.output import (
    ImageRecord,
    OutputFolder,
    RunManifest,
    format_parameters,
    load_manifest,
    make_grid,
    parse_parameters,
    png_pixels,
    read_parameters,
    save_png,
)
from ldm.errors import SdgenError

SETTINGS = {
    "Steps": 50,
    "Sampler": "DDIM",
    "CFG scale": 7.5,
    "Seed": 42,
    "Size": "512x512",
    "Model hash": "1a2b3c4d5e",
    "Model": "sd-v1-4",
}


def test_format_matches_a1111_layout():
    text = format_parameters("a cat", "", SETTINGS)
    assert text == (
        "a cat\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: sd-v1-4"
    )
    with_negative = format_parameters("a cat", "blurry", {"Steps": 2})
    assert with_negative == "a cat\nNegative prompt: blurry\nSteps: 2"


def test_parameters_round_trip_with_quoting():
    settings = {**SETTINGS, "Denoising strength": 0.75, "Note": 'has, comma: and "quotes"', "Skipped": None}
    text = format_parameters("line one\nline two, with comma", "ugly, blurry", settings)
    assert "Skipped" not in text
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "line one\nline two, with comma"
    assert parsed["negative_prompt"] == "ugly, blurry"
    assert parsed["Note"] == 'has, comma: and "quotes"'
    assert parsed["Steps"] == "50" and parsed["Seed"] == "42" and parsed["Size"] == "512x512"
    assert parsed["Model hash"] == "1a2b3c4d5e" and parsed["Denoising strength"] == "0.75"


def test_png_carries_parameters_chunk(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (8, 12, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    digest = save_png(pixels, path, format_parameters("p", "n", SETTINGS))
    with Image.open(path) as image:
        assert image.text["parameters"].startswith("p\nNegative prompt: n\nSteps: 50")
    assert read_parameters(path)["Model"] == "sd-v1-4"
    assert np.array_equal(png_pixels(path), pixels)
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_parameters_without_chunk_is_a_user_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(SdgenError, match="no 'parameters'"):
        read_parameters(path)


@pytest.mark.parametrize("count,n_rows", [(6, 3), (5, 2), (3, 0), (1, 4)])
def test_grid_geometry_matches_torchvision(count, n_rows):
    from torchvision.utils import make_grid as tv_make_grid

    rng = np.random.RandomState(count)
    images = [rng.randint(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(count)]
    ours = make_grid(images, n_rows)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    theirs = tv_make_grid(stacked, nrow=max(n_rows, 1)).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, theirs)


def test_numbering_continues_after_existing_files(tmp_path):
    (tmp_path / "samples").mkdir()
    for name in ("00000.png", "00007.png", "notes.txt"):
        (tmp_path / "samples" / name).write_bytes(b"")
    (tmp_path / "grid-0003.png").write_bytes(b"")
    folder = OutputFolder(tmp_path)
    assert folder.run_number == 4
    assert folder.manifest_path.name == "run-0004.json" and folder.grid_path.name == "grid-0004.png"
    path, _ = folder.save_sample(np.zeros((4, 4, 3), np.uint8), 0, None)
    assert path.name == "00008.png"  # image k of the run is first_sample + k
    assert folder.save_sample(np.zeros((4, 4, 3), np.uint8), 1, None)[0].name == "00009.png"
    folder.continue_run(2, 100)  # --resume: an earlier run's numbers
    assert folder.sample_path(3).name == "00103.png" and folder.manifest_path.name == "run-0002.json"
    assert not list(tmp_path.glob("samples/.*.tmp"))  # written beside, then renamed


def test_unwritable_output_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SdgenError, match="cannot write to the output folder"):
        OutputFolder(blocker / "out")


def test_manifest_is_rewritten_after_each_image(tmp_path):
    manifest = RunManifest(tmp_path / "run-0000.json", {"command": "txt2img", "seeds": [1, 2]})
    assert load_manifest(manifest.path)["status"] == "running"
    manifest.add_image(ImageRecord(0, 1, "p", "samples/00000.png", "ab"))
    on_disk = load_manifest(manifest.path)
    assert on_disk["images"] == [{"index": 0, "seed": 1, "prompt": "p", "file": "samples/00000.png", "sha256": "ab"}]
    manifest.finish("interrupted")
    on_disk = load_manifest(manifest.path)
    assert on_disk["status"] == "interrupted" and on_disk["finished"]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_manifest_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SdgenError, match="not an sdgen run manifest"):
        load_manifest(path)
    path.write_text("{not json")
    with pytest.raises(SdgenError, match="is not valid JSON, truncated or damaged"):
        load_manifest(path)
