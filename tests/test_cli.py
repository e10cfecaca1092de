"""The ``sdgen`` command: in-process (typer's CliRunner) and as a real subprocess, on the tiny model (CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm.generation import run as run_engine
from ldm.cli.app import app
from ldm.output import load_manifest, png_pixels, read_parameters

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_args(tiny_checkpoint, tiny_config) -> list[str]:
    return ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--device", "cpu"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int = 2, match: str = "") -> str:
    """Exit ``code``, exactly one stderr line, no traceback; returns that line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def images(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_inputs(tmp_path, tiny_config) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "blocker").write_text("a file, not a folder")
    Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
    # a config the tiny checkpoint does not fit (UNet twice as wide)
    text = tiny_config.read_text().replace("model_channels: 32", "model_channels: 64")
    (tmp_path / "wide.yaml").write_text(text)
    return {"dir": tmp_path}


BAD_INPUTS = {
    # name: (command + flags, expected text in the error, caught before the model is loaded)
    "missing checkpoint": (["txt2img", "--ckpt", "{dir}/nope.ckpt"], "checkpoint not found", True),
    "config mismatch": (["txt2img", "--config", "{dir}/wide.yaml"], "sdgen: error:", False),
    "H not multiple of 8": (["txt2img", "--H", "20"], "--H must be a positive multiple of 8", True),
    "W not multiple of 8": (["txt2img", "--W", "36"], "--W must be a positive multiple of 8", True),
    "steps < 1": (["txt2img", "--steps", "0"], "--steps must be at least 1", True),
    "steps the DDIM grid refuses": (["txt2img", "--steps", "3"], "steps", True),
    "--f not the config factor": (["txt2img", "--H", "24", "--f", "4"], "--f 4 does not match", True),
    "strength 0": (["img2img", "--init-img", "{dir}/init.png", "--strength", "0"], "--strength must be in (0, 1]", True),
    "strength > 1": (["img2img", "--init-img", "{dir}/init.png", "--strength", "1.5"], "(0, 1]", True),
    "unreadable init image": (["img2img", "--init-img", "{dir}/not-an-image.png"],
                              "is not an image (it looks like a text file)", True),
    "missing init image": (["img2img", "--init-img", "{dir}/nope.png"], "init image not found", True),
    "no init image": (["img2img"], "--init-img", True),
    "empty prompt file": (["txt2img", "--from-file", "{dir}/empty.txt"], "holds no prompt", True),
    "missing prompt file": (["txt2img", "--from-file", "{dir}/nope.txt"], "prompt file not found", True),
    "non-UTF-8 prompt file": (["txt2img", "--from-file", "{dir}/latin1.txt"], "not UTF-8", True),
    "unwritable outdir": (["txt2img", "--outdir", "{dir}/blocker/out"], "cannot write to the output folder", True),
    "plms with eta": (["txt2img", "--plms", "--ddim_eta", "0.5"], "eta must be 0", True),
    "contradicting samplers": (["txt2img", "--plms", "--sampler", "euler"], "contradicts", True),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(name, bad_inputs, tiny_checkpoint, tiny_config, monkeypatch):
    args, expected, early = BAD_INPUTS[name]
    folder = bad_inputs["dir"]
    args = [a.format(dir=folder) for a in args]
    base = ["--H", "16", "--W", "16", "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--device", "cpu",
            "--outdir", str(folder / "out")]
    if "--ckpt" not in args:
        base += ["--ckpt", str(tiny_checkpoint)]
    if "--config" not in args:
        base += ["--config", str(tiny_config)]
    if early:  # these must be caught before the (slow) model load
        import ldm.checkpoint

        def refuse(*a, **k):
            raise AssertionError("the model was loaded before the input was checked")

        monkeypatch.setattr(ldm.checkpoint, "load_model", refuse)
    line = assert_one_line_error(invoke(*args[:1], *base, *args[1:]), match=expected)
    assert line.startswith("sdgen: error: ")
    assert not list((folder / "out").glob("samples/*.png"))


def test_missing_default_checkpoint_says_where_the_originals_expect_it(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(invoke("txt2img", "--config", tiny_config, "--H", "16", "--W", "16"))
    assert "models/ldm/stable-diffusion-v1/model.ckpt" in line and "--ckpt" in line


# ----------------------------------------------------------------------------- runs


def test_txt2img_writes_samples_grid_manifest_and_parameters(tmp_path, model_args, tiny_checkpoint):
    out = tmp_path / "out"
    result = invoke("txt2img", "a red cube", *model_args, "--H", "16", "--W", "16", "--ddim_steps", "2",
                    "--n_samples", "2", "--n_iter", "2", "--negative-prompt", "blurry, dark", "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "ready and waiting for you here" in result.stdout
    files = sorted(p.name for p in (out / "samples").iterdir())
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    with Image.open(out / "grid-0000.png") as grid:  # 2 per row, 2 px padding (torchvision make_grid)
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)

    manifest = load_manifest(out / "run-0000.json")
    assert manifest["status"] == "complete" and manifest["grid"] == "grid-0000.png"
    json.loads((out / "run-0000.json").read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert manifest["settings"]["s_tmax"] == "inf" and manifest["settings"]["grid"] == "ddim"
    assert manifest["seeds"] == [42, 43, 44, 45]
    assert [img["seed"] for img in manifest["images"]] == [42, 43, 44, 45]
    ckpt_sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert manifest["model"]["checkpoint_sha256"] == ckpt_sha
    assert manifest["options"]["steps"] == 2 and manifest["options"]["negative_prompt"] == "blurry, dark"
    assert manifest["versions"]["sdgen"] and manifest["versions"]["torch"]
    for record in manifest["images"]:
        assert hashlib.sha256((out / record["file"]).read_bytes()).hexdigest() == record["sha256"]

    params = read_parameters(out / "samples" / "00003.png")
    assert params["prompt"] == "a red cube" and params["negative_prompt"] == "blurry, dark"
    assert params["Seed"] == "45" and params["Steps"] == "2" and params["Sampler"] == "DDIM"
    assert params["CFG scale"] == "7.5" and params["Size"] == "16x16"
    assert params["Model hash"] == ckpt_sha[:10] and params["Model"] == tiny_checkpoint.stem
    assert params["Batch size"] == "2" and params["Batch pos"] == "1"


def test_original_and_dashed_flag_names_agree(tmp_path, model_args):
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = invoke("txt2img", *model_args, "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1",
                "--n_iter", "1", "--skip_grid", "--ddim_eta", "0.0", "--outdir", a)
    r2 = invoke("txt2img", *model_args, "--height", "16", "--width", "16", "--steps", "2", "--n-samples", "1",
                "--n-iter", "1", "--skip-grid", "--eta", "0.0", "--outdir", b)
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.stderr, r2.stderr)
    assert not list(a.glob("grid-*.png"))
    assert np.array_equal(images(a)[0], images(b)[0])
    assert read_parameters(a / "samples" / "00000.png")["prompt"] == "a painting of a virus monster playing guitar"


@pytest.mark.parametrize("flag,label", [("--plms", "PLMS"), ("--dpm_solver", "DPM++ 2M"), ("--sampler=heun", "Heun")])
def test_sampler_flags(tmp_path, model_args, flag, label):
    result = invoke("txt2img", "x", *model_args, flag, "--H", "16", "--W", "16", "--steps", "2",
                    "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert read_parameters(tmp_path / "samples" / "00000.png")["Sampler"] == label


def test_from_file_renders_each_prompt(tmp_path, model_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\na green cone\n")
    out = tmp_path / "out"
    result = invoke("txt2img", *model_args, "--from-file", prompts, "--n_samples", "2", "--n_iter", "1",
                    "--H", "16", "--W", "16", "--steps", "2", "--outdir", out)
    assert result.exit_code == 0, result.stderr
    params = [read_parameters(p) for p in sorted((out / "samples").glob("*.png"))]
    assert [p["prompt"] for p in params] == ["a red cube", "a blue sphere", "a green cone"]
    assert [p["Seed"] for p in params] == ["42", "43", "44"]
    assert [p["Batch size"] for p in params] == ["2", "2", "1"]
    manifest = load_manifest(out / "run-0000.json")
    assert manifest["prompts"] == ["a red cube", "a blue sphere", "a green cone"] and manifest["per_image_prompts"]


def test_img2img_with_init_image(tmp_path, model_args):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (20, 26, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    result = invoke("img2img", "a cat", *model_args, "--init-img", init, "--strength", "0.5", "--steps", "4",
                    "--outdir", out)
    assert result.exit_code == 0, result.stderr
    samples = images(out)
    assert len(samples) == 2  # img2img defaults: n_samples 2, n_iter 1
    assert samples[0].shape == (20, 24, 3)  # rounded down to a multiple of f (2) x UNet downsampling (2)
    params = read_parameters(out / "samples" / "00000.png")
    assert params["Denoising strength"] == "0.5" and params["Size"] == "24x20" and params["CFG scale"] == "5.0"
    manifest = load_manifest(out / "run-0000.json")
    assert manifest["init_image"]["sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()


def test_replay_gives_identical_pixels(tmp_path, model_args):
    first = tmp_path / "first"
    result = invoke("txt2img", "a red cube", *model_args, "--H", "16", "--W", "16", "--steps", "4",
                    "--ddim_eta", "0.7", "--n_samples", "2", "--n_iter", "2", "--outdir", first)
    assert result.exit_code == 0, result.stderr
    again = tmp_path / "again"
    replayed = invoke("replay", first / "run-0000.json", "--outdir", again)
    assert replayed.exit_code == 0, replayed.stderr
    original, copy = images(first), images(again)
    assert len(original) == 4 and all(np.array_equal(a, b) for a, b in zip(original, copy))
    assert load_manifest(again / "run-0000.json")["seeds"] == [42, 43, 44, 45]

    # a replay refuses a checkpoint that is not the recorded one
    data = json.loads((first / "run-0000.json").read_text())
    data["model"]["checkpoint_sha256"] = "0" * 64
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    assert_one_line_error(invoke("replay", tmp_path / "tampered.json", "--outdir", tmp_path / "x"),
                          match="checkpoint differs")


def test_interrupt_keeps_written_images(tmp_path, model_args, monkeypatch):
    real_generate = run_engine.generate

    def interrupted(*args, **kwargs):
        for n, image in enumerate(real_generate(*args, **kwargs)):
            if n == 2:  # Ctrl-C while the third batch runs
                raise KeyboardInterrupt
            yield image

    monkeypatch.setattr(run_engine, "generate", interrupted)
    out = tmp_path / "out"
    result = invoke("txt2img", *model_args, "--H", "16", "--W", "16", "--steps", "2", "--n_samples", "1",
                    "--n_iter", "4", "--outdir", out)
    line = assert_one_line_error(result, code=130, match="interrupted")
    assert "kept 2 of 4 images" in line
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    manifest = load_manifest(out / "run-0000.json")
    assert manifest["status"] == "interrupted" and len(manifest["images"]) == 2
    assert not list(out.glob("grid-*.png"))


def test_script_shim_keeps_the_original_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scripts/txt2img.py", "--H", "12", "--ddim_steps", "2"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "scripts" / "txt2img.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "sdgen: error: --H must be a positive multiple of 8, got 12"


# ----------------------------------------------------------------------------- real subprocess


def sdgen(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed ``sdgen`` console script (or its entry point when not installed)."""
    exe = shutil.which("sdgen")
    command = [exe] if exe else [sys.executable, "-m", "ldm.cli"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("SDGEN_TEST_THREADS", "1"))
    return subprocess.run([*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_subprocess_txt2img_end_to_end(tmp_path, tiny_checkpoint, tiny_config):
    proc = sdgen("txt2img", "a red cube", "--ckpt", tiny_checkpoint, "--config", tiny_config, "--device", "cpu",
                 "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "1",
                 "--outdir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ready and waiting" in proc.stdout
    out = tmp_path / "out"
    assert len(images(out)) == 2 and (out / "grid-0000.png").is_file()
    assert read_parameters(out / "samples" / "00001.png")["Seed"] == "43"
    assert load_manifest(out / "run-0000.json")["status"] == "complete"


def test_subprocess_bad_input(tmp_path, tiny_config):
    proc = sdgen("txt2img", "--config", tiny_config, "--H", "20", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sdgen: error: --H must be a positive multiple of 8, got 20"
    assert not (tmp_path / "outputs").exists()
