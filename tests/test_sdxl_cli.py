"""SDXL through the commands, on the tiny SDXL base and refiner (CPU): ``sdgen sdxl-refine`` in-process and as a
subprocess, and ``sdgen txt2img`` / ``img2img`` with an SDXL config (the SDXL pipeline, its flags and defaults)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from ldm.cli.app import register
from ldm.generation.inference import prepare_for_inference
from ldm.output import load_manifest, png_pixels, read_parameters
from tests.safety_tiny import write_flag_all_checker
from tests.sdxl_tiny import SIZE, TINY_CONFIGS, tiny_engine, write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
SPEC = "ldm.cli.sdxl_refine:sdxl_refine"


def make_app() -> typer.Typer:
    """The commands involved, registered the way the ``sdgen`` app registers its commands."""
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app, "sdxl-refine", SPEC)
    register(app, "txt2img", "ldm.cli.txt2img:txt2img")
    register(app, "img2img", "ldm.cli.img2img:img2img")
    register(app, "safe-txt2img", "ldm.cli.safe_txt2img:safe_txt2img")
    return app


def invoke(*args: object):
    return CliRunner().invoke(make_app(), [str(a) for a in args])


def assert_error(result, match: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, hash_cache_dir) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sdxl-tiny")
    return {kind: write_tiny_checkpoint(kind, folder / f"sd_xl_{kind}_tiny.safetensors") for kind in TINY_CONFIGS}


@pytest.fixture
def common() -> list[str]:
    return ["--config", TINY_CONFIGS["base"], "--refiner-config", TINY_CONFIGS["refiner"], "--device", "cpu",
            "--steps", "6"]


def samples(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


def test_two_stage_end_to_end(tmp_path, files, common):
    out = tmp_path / "out"
    result = invoke("sdxl-refine", "--prompt", "a lighthouse at dusk", "--ckpt", files["base"], "--refiner-ckpt",
                    files["refiner"], *common, "--H", "32", "--W", "32", "--n-samples", "2",
                    "--high-noise-frac", "0.5", "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    images = samples(out)
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and (out / "grid-0000.png").is_file()
    params = read_parameters(out / "samples" / "00001.png")
    assert params["Model"] == "sd_xl_base_tiny" and params["Refiner"].startswith("sd_xl_refiner_tiny [")
    assert params["Refiner switch at"] == "0.5" and params["Seed"] == "43" and params["Sampler"] == "Euler"
    assert params["Timestep grid"] == "sgm" and params["CFG scale"] == "5.0"
    manifest = load_manifest(out / "run-0000.json")
    assert manifest["status"] == "complete" and manifest["seeds"] == [42, 43]
    assert manifest["model"]["checkpoint"] == str(files["base"])
    assert manifest["refiner"]["checkpoint"] == str(files["refiner"])
    base_stage, refiner_stage = manifest["stages"]
    assert base_stage["timesteps"] == [999, 832, 666] and refiner_stage["timesteps"] == [499, 333, 166]
    assert base_stage["sigma_end"] == refiner_stage["sigma_start"] and refiner_stage["sigma_end"] == 0.0
    # the same run again gives the same pixels (one seed for both stages)
    again = tmp_path / "again"
    result = invoke("sdxl-refine", "--prompt", "a lighthouse at dusk", "--ckpt", files["base"], "--refiner-ckpt",
                    files["refiner"], *common, "--H", "32", "--W", "32", "--n-samples", "2",
                    "--high-noise-frac", "0.5", "--outdir", again)
    assert result.exit_code == 0
    for a, b in zip(images, samples(again)):
        np.testing.assert_array_equal(a, b)


def test_refine_an_image_with_sdedit(tmp_path, files, common):
    init = tmp_path / "base_output.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "refined"
    result = invoke("sdxl-refine", "--init-img", init, "--prompt", "a lighthouse at dusk", "--refiner-ckpt",
                    files["refiner"], *common, "--strength", "0.5", "--aesthetic-score", "7",
                    "--crop-coords", "4,8", "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    (image,) = samples(out)
    assert image.shape == (40, 36, 3)  # sides rounded down to the refiner's multiple of 4
    params = read_parameters(out / "samples" / "00000.png")
    assert params["Model"] == "sd_xl_refiner_tiny" and "Refiner" not in params
    assert params["Denoising strength"] == "0.5" and params["Aesthetic score"] == "7.0/2.5"
    assert params["Crop"] == "4,8" and params["Original size"] == "40,36"
    (stage,) = load_manifest(out / "run-0000.json")["stages"]
    assert stage["stage"] == "refiner" and stage["steps"] == 2 and stage["timesteps"] == [333, 166]


@pytest.mark.parametrize("frac", ["0", "1", "1.5", "-0.1"])
def test_high_noise_frac_outside_zero_one_is_refused(tmp_path, files, common, frac):
    result = invoke("sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["refiner"], *common,
                    "--high-noise-frac", frac, "--outdir", tmp_path)
    assert_error(result, "--high-noise-frac must be strictly between 0 and 1")


def test_sd1_checkpoint_given_to_sdxl_refine(tmp_path, files, common, tiny_checkpoint):
    result = invoke("sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", tiny_checkpoint, *common,
                    "--outdir", tmp_path)
    line = assert_error(result, "--refiner-ckpt sd1-tiny.safetensors is not an SDXL checkpoint")
    assert "v1-inference.yaml" in line and "expects the SDXL refiner file (sd_xl_refiner_0.9.safetensors)" in line
    result = invoke("sdxl-refine", "x", "--ckpt", tiny_checkpoint, "--refiner-ckpt", files["refiner"], *common,
                    "--outdir", tmp_path)
    assert_error(result, "expects the SDXL base file (sd_xl_base_0.9.safetensors)")


def test_sdxl_checkpoint_given_to_an_sd1_config(tmp_path, files, tiny_config):
    result = invoke("txt2img", "x", "--ckpt", files["base"], "--config", tiny_config, "--device", "cpu",
                    "--outdir", tmp_path)
    assert_error(result, "configs/sdxl/sd_xl_base.yaml")


def test_refiner_loaded_with_the_base_config_names_the_refiner_config(tmp_path, files):
    result = invoke("txt2img", "x", "--ckpt", files["refiner"], "--config", TINY_CONFIGS["base"], "--device", "cpu",
                    "--H", "32", "--W", "32", "--outdir", tmp_path)
    assert_error(result, "the file looks like it needs configs/sdxl/sd_xl_refiner.yaml")


def test_refiner_passed_as_base_is_detected_from_its_keys(tmp_path, files, common):
    result = invoke("sdxl-refine", "x", "--ckpt", files["refiner"], "--refiner-ckpt", files["refiner"], *common,
                    "--outdir", tmp_path)
    line = assert_error(result, "--ckpt sd_xl_refiner_tiny.safetensors is the SDXL refiner checkpoint")
    assert "pass it as --refiner-ckpt" in line
    result = invoke("sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["base"], *common,
                    "--outdir", tmp_path)
    assert_error(result, "--refiner-ckpt sd_xl_base_tiny.safetensors is the SDXL base checkpoint (pass it as --ckpt)")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ckpt", "B"], "sdxl-refine needs the refiner checkpoint"),
        (["--refiner-ckpt", "R"], "pass --ckpt sd_xl_base_0.9.safetensors"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--init-img", "I"], "not both"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--strength", "0.3"], "--strength applies to --init-img"),
        (["--init-img", "I", "--refiner-ckpt", "R", "--high-noise-frac", "0.8"], "not to --init-img"),
        (["--init-img", "I", "--refiner-ckpt", "R", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--grid", "karras"], "unknown --grid 'karras'"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--original-size", "1024"], "--original-size takes two"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--crop-coords", "a,b"], "--crop-coords takes two"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--H", "30"],
         "--H 30 must be a multiple of 4 for this model (VAE factor 2 x UNet downsampling 2)"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--W", "0"], "--W must be a positive number of pixels, got 0"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--steps", "0"], "--steps must be at least 1"),
        (["--ckpt", "B", "--refiner-ckpt", "R", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["--ckpt", "B", "--refiner-ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
        (["--init-img", "missing.png", "--refiner-ckpt", "R"], "init image not found: missing.png"),
    ],
)
def test_bad_input_is_one_line(tmp_path, files, common, args, message):
    names = {"B": files["base"], "R": files["refiner"], "I": files["base"]}
    args = [str(names.get(a, a)) for a in args]
    result = invoke("sdxl-refine", "x", *common, *args, "--outdir", tmp_path / "out")
    assert_error(result, message)
    assert not (tmp_path / "out" / "samples").exists()


@pytest.mark.parametrize("steps_flag", ["--steps", "--ddim_steps", "--ddim-steps"])
def test_steps_too_few_for_the_split_are_refused_before_loading(tmp_path, files, common, monkeypatch, steps_flag):
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    # 2 steps: t = 999, 499; 0.6 hands over at t = 400, after both
    result = invoke("sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["refiner"], *common,
                    steps_flag, "2", "--high-noise-frac", "0.6", "--H", "32", "--W", "32", "--outdir", tmp_path)
    assert_error(result, "leaves the refiner no step")
    init = tmp_path / "init.png"
    Image.new("RGB", (SIZE, SIZE)).save(init)
    result = invoke("sdxl-refine", "x", "--init-img", init, "--refiner-ckpt", files["refiner"], *common,
                    steps_flag, "2", "--strength", "0.5", "--outdir", tmp_path)
    assert_error(result, "leaves no denoising step")


def test_image_sides_must_fit_the_models_downsampling(tmp_path, files, common, monkeypatch):
    """The error names the multiple and where it comes from (VAE factor x UNet downsampling of the configs)."""
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    init = tmp_path / "init.png"
    Image.new("RGB", (SIZE, SIZE)).save(init)
    result = invoke("sdxl-refine", "x", "--init-img", init, "--refiner-ckpt", files["refiner"], *common,
                    "--W", "18", "--outdir", tmp_path / "out")
    assert_error(result, "--W 18 must be a multiple of 4 for this model (VAE factor 2 x UNet downsampling 2)")


@pytest.mark.parametrize("steps", [3, 37, 600])
def test_legacy_grid_counts_past_the_table_are_refused_before_loading(tmp_path, files, common, monkeypatch, steps):
    """--grid sgm_legacy: range(0, 1000, 1000 // S) + 1 reaches t = 1000 for these S; one line, exit 2."""
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    expected = f"{steps} steps on the sgm_legacy grid would put the last SGM 0.9 timestep at t=1000"
    result = invoke("txt2img", "x", "--config", TINY_CONFIGS["base"], "--ckpt", files["base"], "--device", "cpu",
                    "--grid", "sgm_legacy", "--steps", steps, "--H", SIZE, "--W", SIZE, "--outdir", tmp_path)
    assert "use e.g." in assert_error(result, expected)
    result = invoke("sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["refiner"], *common,
                    "--grid", "sgm_legacy", "--steps", steps, "--H", SIZE, "--W", SIZE, "--outdir", tmp_path)
    assert_error(result, expected)
    init = tmp_path / "init.png"
    Image.new("RGB", (SIZE, SIZE)).save(init)
    result = invoke("sdxl-refine", "x", "--init-img", init, "--refiner-ckpt", files["refiner"], *common,
                    "--grid", "sgm_legacy", "--steps", steps, "--outdir", tmp_path)
    assert_error(result, expected)


def test_command_line_end_to_end(tmp_path, files, sdgen_main):
    args = ["sdxl-refine", "--prompt", "a lighthouse at dusk", "--ckpt", files["base"], "--refiner-ckpt",
            files["refiner"], "--config", TINY_CONFIGS["base"], "--refiner-config", TINY_CONFIGS["refiner"],
            "--device", "cpu", "--H", "32", "--W", "32", "--steps", "6", "--outdir", "out"]
    code, out, err = sdgen_main(args, cwd=tmp_path)
    assert code == 0, err
    assert "ready and waiting" in out
    assert read_parameters(tmp_path / "out" / "samples" / "00000.png")["Refiner switch at"] == "0.8"
    code, out, err = sdgen_main(["sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["refiner"],
                                 "--high-noise-frac", "1.2"], cwd=tmp_path)
    assert code == 2 and err.strip().splitlines() == [
        "sdgen: error: --high-noise-frac must be strictly between 0 and 1 (the base's share of the noise range), "
        "got 1.2"
    ]


# ----------------------------------------------------------------------------- txt2img / img2img with an SDXL config


@pytest.fixture(scope="module")
def tiny_base():
    """The base as the commands prepare it (packed convolutions on the CPU)."""
    return prepare_for_inference(tiny_engine("base"), "autocast", torch.device("cpu"))


def library_images(base, n: int = 1, **settings) -> list[np.ndarray]:
    """The library run (:func:`ldm.generation.api.generate_images` on the base) the command must reproduce."""
    from ldm.generation.api import generate_images

    values = {**dict(sampler="euler", steps=2, scale=5.0, height=SIZE, width=SIZE, seed=42), **settings}
    return [image.pixels for image in generate_images(base, "a lighthouse at dusk", n=n, **values)]


def test_txt2img_with_an_sdxl_config_runs_the_sdxl_pipeline(tmp_path, files, tiny_base):
    out = tmp_path / "out"
    result = invoke("txt2img", "a lighthouse at dusk", "--config", TINY_CONFIGS["base"], "--ckpt", files["base"],
                    "--device", "cpu", "--H", SIZE, "--W", SIZE, "--steps", 2, "--n_samples", 2, "--n_iter", 1,
                    "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    expected = library_images(tiny_base, n=2)
    for got, want in zip(samples(out), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    params = read_parameters(out / "samples" / "00001.png")  # no sampler / scale flag: the SGM demo's defaults
    assert params["Sampler"] == "Euler" and params["CFG scale"] == "5.0" and params["Timestep grid"] == "sgm"
    assert params["Original size"] == "32,32" and params["Crop"] == "0,0" and params["Target size"] == "32,32"
    manifest = load_manifest(out / "run-0000.json")
    assert manifest["options"]["sampler"] == "euler" and manifest["options"]["scale"] == 5.0
    (stage,) = manifest["stages"]
    assert stage["timesteps"] == [999, 499] and stage["sigma_end"] == 0.0
    assert manifest["safety"]["watermark"] == format(0xB3EC907BB19E, "048b")  # the SGM 48-bit message

    # the micro-conditioning flags reach the model
    flagged = tmp_path / "flags"
    result = invoke("txt2img", "a lighthouse at dusk", "--config", TINY_CONFIGS["base"], "--ckpt", files["base"],
                    "--device", "cpu", "--H", SIZE, "--W", SIZE, "--steps", 2, "--n_samples", 1, "--n_iter", 1,
                    "--original-size", "512,256", "--crop-coords", "8,4", "--grid", "sgm_legacy", "--outdir", flagged)
    assert result.exit_code == 0, (result.stderr, result.exception)
    settings = {"original_size": (512, 256), "crop_coords": (8, 4), "grid": "sgm_legacy"}
    np.testing.assert_array_equal(samples(flagged)[0], library_images(tiny_base, **settings)[0])
    assert not np.array_equal(samples(flagged)[0], expected[0])
    params = read_parameters(flagged / "samples" / "00000.png")
    assert params["Original size"] == "512,256" and params["Crop"] == "8,4" and params["Timestep grid"] == "sgm_legacy"


def test_img2img_with_an_sdxl_config_is_sdedit(tmp_path, files, tiny_base):
    import torch

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    result = invoke("img2img", "a lighthouse at dusk", "--init-img", init, "--strength", "0.6", "--steps", 4,
                    "--config", TINY_CONFIGS["base"], "--ckpt", files["base"], "--device", "cpu", "--n_samples", 1,
                    "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    image = torch.from_numpy(np.asarray(Image.open(init), dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    expected = library_images(tiny_base, steps=4, init_image=image, strength=0.6)
    np.testing.assert_array_equal(samples(out)[0], expected[0])
    (stage,) = load_manifest(out / "run-0000.json")["stages"]
    # SGM pruning: the int(0.6 * 5) = 3 lowest of [sigma(t) for t = 999, 749, 499, 249] + [0]
    assert stage["timesteps"] == [499, 249]
    assert read_parameters(out / "samples" / "00000.png")["Denoising strength"] == "0.6"


def test_model_family_defaults_fill_unset_flags(tmp_path, files, tiny_checkpoint, tiny_config):
    """Unset steps / sampler / scale / size take the family's defaults: SGM's for SDXL, CompVis's otherwise."""
    from ldm.generation.options import GenerateOptions
    from ldm.generation.plan import plan_run

    def planned(command: str, config: Path, ckpt: Path, **kw) -> GenerateOptions:
        opts = GenerateOptions(command=command, config=str(config), ckpt=str(ckpt), device="cpu",
                               outdir=str(tmp_path / command), **kw)
        return plan_run(opts).opts

    sdxl = planned("txt2img", TINY_CONFIGS["base"], files["base"])
    assert (sdxl.sampler, sdxl.steps, sdxl.scale, sdxl.height, sdxl.width, sdxl.grid) == ("euler", 50, 5.0, 1024,
                                                                                           1024, "sgm")
    sd1 = planned("txt2img", tiny_config, tiny_checkpoint)
    assert (sd1.sampler, sd1.steps, sd1.scale, sd1.height, sd1.width, sd1.grid) == ("ddim", 50, 7.5, 512, 512, None)
    init = tmp_path / "init.png"
    Image.new("RGB", (24, 16)).save(init)
    sd1_img2img = planned("img2img", tiny_config, tiny_checkpoint, init_img=str(init))
    assert (sd1_img2img.scale, sd1_img2img.height) == (5.0, None)
    given = planned("txt2img", TINY_CONFIGS["base"], files["base"], steps=3, scale=2.0, sampler="heun", height=64)
    assert (given.sampler, given.steps, given.scale, given.height, given.width) == ("heun", 3, 2.0, 64, 1024)


def test_sdxl_flags_and_short_schedules_are_refused_before_loading(tmp_path, files, tiny_checkpoint, tiny_config,
                                                                 monkeypatch):
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    result = invoke("txt2img", "x", "--config", tiny_config, "--ckpt", tiny_checkpoint, "--H", 16, "--W", 16,
                    "--aesthetic-score", "7", "--crop-coords", "0,8", "--outdir", tmp_path)
    assert_error(result, "--crop-coords, --aesthetic-score apply to SDXL models only")
    init = tmp_path / "init.png"
    Image.new("RGB", (SIZE, SIZE)).save(init)
    result = invoke("img2img", "x", "--init-img", init, "--config", TINY_CONFIGS["base"], "--ckpt", files["base"],
                    "--steps", 2, "--strength", "0.3", "--outdir", tmp_path)
    assert_error(result, "leaves no denoising step")  # SDEdit on the SDXL grid: int(0.3 * 3) < 2


def test_safety_flags_of_sdxl_refine(tmp_path, files, common):
    checker = write_flag_all_checker(tmp_path / "flag-all.safetensors")
    args = ["sdxl-refine", "x", "--ckpt", files["base"], "--refiner-ckpt", files["refiner"], *common, "--steps", 2,
            "--H", SIZE, "--W", SIZE, "--high-noise-frac", "0.5"]
    result = invoke(*args, "--safety-checker", checker, "--outdir", tmp_path / "flagged")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert samples(tmp_path / "flagged")[0].max() == 0, "a flagged image must be saved black"
    assert read_parameters(tmp_path / "flagged" / "samples" / "00000.png")["Safety checker"] == "flagged"
    result = invoke(*args, "--safety-checker", checker, "--no-safety-checker", "--no-watermark",
                    "--outdir", tmp_path / "off")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert samples(tmp_path / "off")[0].max() > 0
    assert load_manifest(tmp_path / "off" / "run-0000.json")["safety"] == {"checker": None, "watermark": None}


def test_safe_txt2img_runs_sld_on_sdxl(tmp_path, files):
    """SLD is model-agnostic: safe-txt2img on the SDXL base steers the images; --sld-guidance-scale 0 is plain
    classifier-free guidance, bit for bit (the txt2img images)."""
    common = ["a lighthouse at dusk", "--config", TINY_CONFIGS["base"], "--ckpt", files["base"], "--device", "cpu",
              "--H", SIZE, "--W", SIZE, "--steps", 3, "--n_samples", 1, "--n_iter", 1]
    assert invoke("txt2img", *common, "--outdir", tmp_path / "plain").exit_code == 0
    result = invoke("safe-txt2img", *common, "--sld", "max", "--sld-warmup-steps", 0, "--outdir", tmp_path / "sld")
    assert result.exit_code == 0, (result.stderr, result.exception)
    result = invoke("safe-txt2img", *common, "--sld-guidance-scale", 0, "--outdir", tmp_path / "off")
    assert result.exit_code == 0, (result.stderr, result.exception)
    plain, sld, off = (samples(tmp_path / name)[0] for name in ("plain", "sld", "off"))
    np.testing.assert_array_equal(plain, off)
    assert np.abs(plain.astype(int) - sld.astype(int)).mean() > 1
    params = read_parameters(tmp_path / "sld" / "samples" / "00000.png")
    assert params["SLD"] == "max" and params["Timestep grid"] == "sgm"
    assert load_manifest(tmp_path / "sld" / "run-0000.json")["options"]["sld"]["source"] == "max"
