"""Every file a user hands to sdgen is checked before use: a missing, empty (0 bytes), truncated or wrong-kind
file is one stderr line naming the file and what is wrong, exit code 2, no traceback; a truncated image is
refused, never decoded in part."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm.checkpoint import load_config, load_model_config
from ldm.checkpoint_reader import read_pickle_checkpoint, read_state_dict
from ldm.cli.app import app
from ldm.output import load_manifest
from ldm.errors import SdgenError
from ldm.files import looks_like, read_text_file, require_file
from ldm.models.diffusion.unclip import read_clip_stats
from ldm.generation.images import read_image
from ldm.safety.checker import load_safety_checker
from ldm.sld_config import load_sld_config


def png_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_checkpoint) -> Path:
    """A folder of broken files, named by what is wrong with them."""
    d = tmp_path_factory.mktemp("bad-files")
    png, jpeg, ckpt = png_bytes(), jpeg_bytes(), torch_bytes({"state_dict": {"w": torch.zeros(64)}})
    st = tiny_checkpoint.read_bytes()
    files = {
        "empty.bin": b"",
        "empty.safetensors": b"",
        "truncated.safetensors": st[: len(st) // 2],
        "truncated-header.safetensors": st[:100],
        "truncated.ckpt": ckpt[: len(ckpt) // 2],
        "png.ckpt": png,
        "text.ckpt": b"a red circle\n",
        "png.yaml": png,
        "no-model.yaml": b"other: 1\n",
        "truncated.png": png[:-12],  # only the IEND chunk is cut: PIL would decode it silently
        "half.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[:-2],  # the end-of-image marker is cut
        "text.png": b"a red circle\n",
        "png.txt": png,
        "utf16.txt": "a red circle\n".encode("utf-16"),
        "png.json": png,
        "truncated.json": b'{"format": "sdgen-run", "options": {"pro',
        "truncated.th": torch_bytes((torch.zeros(4), torch.ones(4)))[:200],
        "png.th": png,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


READERS = {
    "checkpoint": (read_state_dict, "the checkpoint"),
    "config": (load_config, "the config"),
    "init image": (read_image, "the init image"),
    "prompt file": (lambda p: read_text_file(p, "prompt file"), "the prompt file"),
    "run manifest": (load_manifest, "the run manifest"),
    "CLIP statistics": (read_clip_stats, "the CLIP statistics file"),
    "safety checker": (load_safety_checker, "the safety-checker file"),
    "SLD config": (load_sld_config, "the SLD config"),
}

CASES = [
    # (reader, file, what the message must say)
    ("checkpoint", "empty.bin", "is empty (0 bytes)"),
    ("checkpoint", "empty.safetensors", "is empty (0 bytes)"),
    ("checkpoint", "truncated.safetensors", "is truncated: its tensors need"),
    ("checkpoint", "truncated-header.safetensors", "is truncated: its header needs"),
    ("checkpoint", "truncated.ckpt", "truncated or damaged zip archive"),
    ("checkpoint", "png.ckpt", "not a PyTorch checkpoint (it looks like a PNG image)"),
    ("checkpoint", "text.ckpt", "not a PyTorch checkpoint (it looks like a text file)"),
    ("config", "empty.bin", "is empty (0 bytes)"),
    ("config", "png.yaml", "not UTF-8 text (it looks like a PNG image)"),
    ("init image", "empty.bin", "is empty (0 bytes)"),
    ("init image", "truncated.png", "truncated or damaged"),
    ("init image", "half.png", "truncated or damaged"),
    ("init image", "truncated.jpg", "truncated JPEG"),
    ("init image", "text.png", "not an image (it looks like a text file)"),
    ("prompt file", "empty.bin", "is empty (0 bytes)"),
    ("prompt file", "png.txt", "not UTF-8 text (it looks like a PNG image)"),
    ("prompt file", "utf16.txt", "not UTF-8 text"),
    ("run manifest", "empty.bin", "is empty (0 bytes)"),
    ("run manifest", "png.json", "not UTF-8 text (it looks like a PNG image)"),
    ("run manifest", "truncated.json", "not valid JSON, truncated or damaged"),
    ("CLIP statistics", "empty.bin", "is empty (0 bytes)"),
    ("CLIP statistics", "truncated.th", "truncated or damaged zip archive"),
    ("CLIP statistics", "png.th", "not a PyTorch checkpoint (it looks like a PNG image)"),
    ("safety checker", "empty.bin", "is empty (0 bytes)"),
    ("safety checker", "truncated.safetensors", "is truncated"),
    ("safety checker", "png.ckpt", "not a PyTorch checkpoint (it looks like a PNG image)"),
    ("SLD config", "empty.bin", "is empty (0 bytes)"),
    ("SLD config", "png.yaml", "not UTF-8 text (it looks like a PNG image)"),
]


@pytest.mark.parametrize("reader,name,message", CASES, ids=[f"{r}-{n}" for r, n, _ in CASES])
def test_each_reader_names_the_file_and_the_problem(bad, reader, name, message):
    read, role = READERS[reader]
    with pytest.raises(SdgenError) as info:
        read(bad / name)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(role) and name in text and message in text, text


def test_a_complete_image_still_reads(bad, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    assert read_image(good).size == (32, 32)
    jpeg = tmp_path / "good.jpg"
    jpeg.write_bytes(jpeg_bytes())
    assert read_image(jpeg).size == (32, 32)


def test_model_config_needs_a_model_target(bad):
    with pytest.raises(SdgenError, match=r"the config .*no-model.yaml is not a model config \(it has no model.target\)"):
        load_model_config(bad / "no-model.yaml")


def test_require_file_and_looks_like(bad, tmp_path):
    with pytest.raises(SdgenError, match="prompt file not found"):
        require_file(tmp_path / "nope.txt", "prompt file")
    with pytest.raises(SdgenError, match="is a folder, not a file"):
        require_file(tmp_path, "checkpoint")
    assert looks_like(bad / "png.ckpt") == "a PNG image"
    assert looks_like(bad / "truncated.jpg") == "a JPEG image"
    assert looks_like(bad / "truncated.ckpt") == "a zip archive"
    assert looks_like(bad / "truncated.safetensors") == "a safetensors file"
    assert looks_like(bad / "text.ckpt") == "a text file"
    assert looks_like(bad / "empty.bin") == "an empty file"
    with pytest.raises(SdgenError, match="truncated or damaged"):  # a cut legacy (non-zip) pickle
        path = tmp_path / "legacy.pt"
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(8)}, buffer, _use_new_zipfile_serialization=False)
        path.write_bytes(buffer.getvalue()[:-40])
        read_pickle_checkpoint(path)


CLI_CASES = [
    # (command and flags, message), each caught before the model is loaded
    (["txt2img", "--ckpt", "{bad}/empty.bin"], "the checkpoint {bad}/empty.bin is empty (0 bytes)"),
    (["txt2img", "--ckpt", "{bad}/truncated.safetensors"], "is truncated"),
    (["txt2img", "--ckpt", "{bad}/png.ckpt"], "(it looks like a PNG image)"),
    (["txt2img", "--config", "{bad}/empty.bin"], "the config {bad}/empty.bin is empty (0 bytes)"),
    (["txt2img", "--config", "{bad}/no-model.yaml"], "is not a model config"),
    (["img2img", "--init-img", "{bad}/truncated.png"], "the init image {bad}/truncated.png is truncated or damaged"),
    (["img2img", "--init-img", "{bad}/empty.bin"], "the init image {bad}/empty.bin is empty (0 bytes)"),
    (["txt2img", "--from-file", "{bad}/png.txt"], "the prompt file {bad}/png.txt is not UTF-8 text"),
    (["txt2img", "--from-file", "{bad}/empty.bin"], "the prompt file {bad}/empty.bin is empty (0 bytes)"),
    (["safe-txt2img", "--sld-config", "{bad}/empty.bin"], "the SLD config {bad}/empty.bin is empty"),
]


@pytest.mark.parametrize("args,message", CLI_CASES, ids=[" ".join(a[:2]) + " " + a[2].split("/")[-1]
                                                         for a, _ in CLI_CASES])
def test_cli_refuses_bad_files_in_one_line_before_loading(bad, tiny_checkpoint, tiny_config, tmp_path, monkeypatch,
                                                          args, message):
    import ldm.checkpoint

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the file was checked")

    monkeypatch.setattr(ldm.checkpoint, "load_model", refuse)
    args = [a.format(bad=bad) for a in args]
    base = ["--H", "16", "--W", "16", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
            "--outdir", str(tmp_path / "out")]
    if "--ckpt" not in args:
        base += ["--ckpt", str(tiny_checkpoint)]
    if "--config" not in args:
        base += ["--config", str(tiny_config)]
    result = CliRunner().invoke(app, [*args[:1], *base, *args[1:]])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("sdgen: error: ") and message.format(bad=bad) in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("samples/*.png"))


def test_replay_refuses_a_bad_manifest_in_one_line(bad):
    result = CliRunner().invoke(app, ["replay", str(bad / "truncated.json")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(
        f"sdgen: error: the run manifest {bad / 'truncated.json'} is not valid JSON, truncated or damaged (")
    assert len(result.stderr.strip().splitlines()) == 1
