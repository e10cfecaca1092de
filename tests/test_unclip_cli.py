"""``sdgen unclip-variate`` end to end on tiny random unCLIP models (CPU): files, parameters, manifest,
determinism per seed, folders of init images, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.checkpoint import build_model_on_meta, load_config
from ldm.output import png_pixels, read_parameters
from ldm.generation.run import execute, options_from_manifest
from tests.conftest import randomized_state_dict
from tests.safety_tiny import write_flag_all_checker

REPO = Path(__file__).resolve().parent.parent
TINY = {v: str(REPO / "configs" / "tests" / f"unclip-{v}-tiny.yaml") for v in ("l", "h")}
SD2V_TINY = str(REPO / "configs" / "tests" / "sd2v-tiny.yaml")
SPEC = "ldm.cli.unclip_variate:unclip_variate"


@pytest.fixture(scope="module")
def files(tmp_path_factory, hash_cache_dir) -> dict[str, Path]:
    """Tiny checkpoints, init images (a file and a folder of two) and a statistics file."""
    root = tmp_path_factory.mktemp("unclip-cli")
    out: dict[str, Path] = {}
    for name, cfg in (("l", TINY["l"]), ("h", TINY["h"]), ("sd2v", SD2V_TINY)):
        out[name] = root / f"{name}.safetensors"
        save_file(randomized_state_dict(build_model_on_meta(load_config(cfg)), seed=2), str(out[name]))
    rng = np.random.default_rng(0)
    (root / "folder").mkdir()
    for name, size in (("a.png", (64, 64)), ("b.png", (96, 80))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "folder" / name)
    (root / "folder" / "notes.txt").write_text("not an image")
    out["image"] = root / "folder" / "a.png"
    out["folder"] = root / "folder"
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    out["stats"] = root / "ViT-L-14_stats.th"
    torch.save((torch.randn(1, 16) * 0.1, torch.rand(1, 16) + 0.5), out["stats"])
    return out


@pytest.fixture(scope="module")
def cli():
    from ldm.cli.app import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app, "unclip-variate", SPEC)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["unclip-variate", *map(str, args)], catch_exceptions=False)

    return run


def _small(files, outdir, variant="h", *extra):
    return ["--init-img", files["image"], "--ckpt", files[variant], "--config", TINY[variant], "--H", 32, "--W", 32,
            "--steps", 4, "--n_samples", 2, "--n_iter", 1, "--outdir", outdir, "--device", "cpu", *extra]


def _samples(outdir: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((outdir / "samples").glob("*.png"))]


def test_run_writes_samples_grid_parameters_and_manifest(cli, files, tmp_path) -> None:
    result = cli(*_small(files, tmp_path / "out", "l"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    assert png_pixels(samples[0]).shape == (32, 32, 3)
    # unCLIP-L without --clip-stats: said once
    assert result.output.count("--clip-stats") == 1 and "ViT-L-14_stats.th" in result.output

    params = read_parameters(samples[1])
    assert params["prompt"] == ""
    assert params["Steps"] == "4" and params["Sampler"] == "DDIM" and params["CFG scale"] == "10.0"
    assert params["Seed"] == "43" and params["Noise level"] == "0" and params["Init image"] == "a.png"
    assert params["Size"] == "32x32"

    manifest = json.loads((out / "run-0000.json").read_text())
    assert manifest["command"] == "unclip-variate" and manifest["status"] == "complete"
    assert manifest["seeds"] == [42, 43] and manifest["noise_level"] == 0
    assert manifest["options"]["noise_level"] == 0 and manifest["options"]["scale"] == 10.0
    assert manifest["init_images"][0]["path"].endswith("a.png") and len(manifest["init_images"][0]["sha256"]) == 64
    assert manifest["init_image_of"] == [0, 0]
    assert len(manifest["notices"]) == 1 and manifest["model"]["clip_stats_sha256"] is None
    assert [img["file"] for img in manifest["images"]] == ["samples/00000.png", "samples/00001.png"]


def test_defaults_are_the_streamlit_demos() -> None:
    from ldm.defaults import defaults_for

    defaults = defaults_for("unclip-variate", "unclip")
    assert defaults["steps"] == 20 and defaults["scale"] == 10.0 and defaults["noise_level"] == 0
    assert defaults["height"] == defaults["width"] == 768 and defaults["sampler"] == "ddim"
    assert defaults["prompt"] == "" and defaults["n_samples"] == 2 and defaults["n_iter"] == 2
    # text-to-image with the Karlo prior: the same decoder defaults, the prior's 25 steps at guidance 4.0
    prior = defaults_for("txt2img", "unclip")
    assert {k: prior[k] for k in ("steps", "scale", "height", "sampler", "n_samples", "n_iter", "noise_level")} == {
        k: defaults[k] for k in ("steps", "scale", "height", "sampler", "n_samples", "n_iter", "noise_level")}
    assert prior["prior_steps"] == 25 and prior["prior_scale"] == 4.0


def test_per_image_seeds_and_determinism(cli, files, tmp_path) -> None:
    assert cli(*_small(files, tmp_path / "a")).exit_code == 0
    assert cli(*_small(files, tmp_path / "b")).exit_code == 0
    first, again = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], first[1])
    # image 1 (seed 43) alone: same latent noise and the same embedding noise draw
    alone = cli(*_small(files, tmp_path / "c", "h", "--seed", 43, "--n_samples", 1))
    assert alone.exit_code == 0
    assert np.abs(_samples(tmp_path / "c")[0].astype(int) - first[1].astype(int)).max() <= 1


def test_noise_level_prompt_and_clip_stats_change_the_result(cli, files, tmp_path) -> None:
    assert cli(*_small(files, tmp_path / "base", "l", "--n_samples", 1, "--noise-level", 500)).exit_code == 0
    base = _samples(tmp_path / "base")[0]
    assert cli(*_small(files, tmp_path / "lvl", "l", "--n_samples", 1, "--noise-level", 900)).exit_code == 0
    assert not np.array_equal(base, _samples(tmp_path / "lvl")[0])
    assert cli(*_small(files, tmp_path / "txt", "l", "--n_samples", 1, "--noise-level", 500,
                       "--prompt", "in the style of a watercolor")).exit_code == 0
    assert not np.array_equal(base, _samples(tmp_path / "txt")[0])
    with_stats = cli(*_small(files, tmp_path / "st", "l", "--n_samples", 1, "--noise-level", 500,
                             "--clip-stats", files["stats"]))
    assert with_stats.exit_code == 0 and "--clip-stats" not in with_stats.output
    assert not np.array_equal(base, _samples(tmp_path / "st")[0])
    manifest = json.loads((tmp_path / "st" / "run-0000.json").read_text())
    assert manifest["notices"] == [] and len(manifest["model"]["clip_stats_sha256"]) == 64


def test_folder_of_init_images(cli, files, tmp_path) -> None:
    args = _small(files, tmp_path / "out", "h", "--n_samples", 1, "--n_iter", 2)
    args[1] = files["folder"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(samples) == 4
    assert [read_parameters(p)["Init image"] for p in samples] == ["a.png", "b.png", "a.png", "b.png"]
    manifest = json.loads((tmp_path / "out" / "run-0000.json").read_text())
    assert manifest["init_image_of"] == [0, 1, 0, 1] and len(manifest["init_images"]) == 2
    # the first image of the folder run is the single-image run of a.png with seed 42
    assert cli(*_small(files, tmp_path / "single", "h", "--n_samples", 1)).exit_code == 0
    assert np.abs(png_pixels(samples[0]).astype(int) - _samples(tmp_path / "single")[0].astype(int)).max() <= 1
    assert not np.array_equal(png_pixels(samples[0]), png_pixels(samples[1]))


def test_prompt_file_with_a_folder(cli, files, tmp_path) -> None:
    """--from-file: every prompt line is rendered for every init image (batches of --n_samples)."""
    (tmp_path / "prompts.txt").write_text("a watercolor\nan oil painting\n")
    args = _small(files, tmp_path / "out", "h", "--n_samples", 2, "--from-file", tmp_path / "prompts.txt")
    args[1] = files["folder"]
    assert cli(*args).exit_code == 0
    samples = sorted((tmp_path / "out" / "samples").glob("*.png"))
    params = [read_parameters(p) for p in samples]
    got = [(p["prompt"], p["Init image"], p["Seed"]) for p in params]
    assert got == [("a watercolor", "a.png", "42"), ("an oil painting", "a.png", "43"),
                   ("a watercolor", "b.png", "44"), ("an oil painting", "b.png", "45")]


def test_replay_from_the_manifest(cli, files, tmp_path) -> None:
    assert cli(*_small(files, tmp_path / "out", "h", "--noise-level", 100)).exit_code == 0
    data = json.loads((tmp_path / "out" / "run-0000.json").read_text())
    opts, expect = options_from_manifest(data, outdir=str(tmp_path / "again"))
    assert opts.command == "unclip-variate" and opts.noise_level == 100
    execute(opts, expect=expect)
    assert all(np.array_equal(x, y) for x, y in zip(_samples(tmp_path / "out"), _samples(tmp_path / "again")))


def test_safety_checker_and_watermark_flags(cli, files, tmp_path) -> None:
    """The flags of every command: flagged images are saved black, the SD 2 watermark message is recorded."""
    checker = write_flag_all_checker(tmp_path / "flag-all.safetensors")
    assert cli(*_small(files, tmp_path / "flagged", "h", "--safety-checker", checker)).exit_code == 0
    assert all(image.max() == 0 for image in _samples(tmp_path / "flagged"))
    assert read_parameters(tmp_path / "flagged" / "samples" / "00001.png")["Safety checker"] == "flagged"
    manifest = json.loads((tmp_path / "flagged" / "run-0000.json").read_text())
    assert manifest["safety"] == {"checker": str(checker), "watermark": "SDV2"}
    assert cli(*_small(files, tmp_path / "off", "h", "--safety-checker", checker, "--no-safety-checker",
                       "--no-watermark")).exit_code == 0
    assert all(image.max() > 0 for image in _samples(tmp_path / "off"))
    manifest = json.loads((tmp_path / "off" / "run-0000.json").read_text())
    assert manifest["safety"] == {"checker": None, "watermark": None}


def test_sld_flags_add_safe_latent_diffusion(cli, files, tmp_path) -> None:
    assert cli(*_small(files, tmp_path / "plain", "h")).exit_code == 0
    assert cli(*_small(files, tmp_path / "sld", "h", "--sld", "max", "--sld-warmup-steps", 0)).exit_code == 0
    plain, sld = _samples(tmp_path / "plain"), _samples(tmp_path / "sld")
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(plain, sld))
    assert read_parameters(tmp_path / "sld" / "samples" / "00000.png")["SLD"] == "max"
    assert "SLD" not in read_parameters(tmp_path / "plain" / "samples" / "00000.png")


@pytest.mark.parametrize("extra, message", [
    (["--noise-level", 1000], "--noise-level must be in 0..999"),
    (["--noise-level", -1], "--noise-level must be in 0..999"),
    (["--steps", 0], "--steps must be at least 1"),
    (["--H", 30], "--H must be a positive multiple of 8"),
    (["--clip-stats", "/nonexistent/stats.th"], "--clip-stats file not found"),
    (["--sampler", "nope"], "unknown sampler"),
])
def test_bad_options_are_one_line_errors(cli, files, tmp_path, extra, message) -> None:
    result = cli(*_small(files, tmp_path / "out", "h", *extra))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "samples").exists()


def test_wrong_model_or_input_is_refused_with_what_is_needed(cli, files, tmp_path) -> None:
    needs = "sd21-unclip-l.ckpt"
    args = _small(files, tmp_path / "o")
    ckpt_at, config_at = args.index("--ckpt") + 1, args.index("--config") + 1

    sd2_ckpt = list(args)
    sd2_ckpt[ckpt_at], sd2_ckpt[config_at] = files["sd2v"], TINY["h"]
    result = cli(*sd2_ckpt)
    assert result.exit_code == 2 and "not a Stable unCLIP checkpoint" in result.output and needs in result.output

    sd2_config = list(args)
    sd2_config[config_at] = SD2V_TINY
    result = cli(*sd2_config)
    assert result.exit_code == 2 and "not a Stable unCLIP config" in result.output and needs in result.output

    guessed = [a for i, a in enumerate(args) if i not in (config_at - 1, config_at)]
    result = cli(*guessed)  # no --config: the bundled full-size -H config is picked from the checkpoint's keys
    assert result.exit_code == 2 and "--H 32 must be a multiple of 64" in result.output
    guessed[guessed.index("--H") + 1] = guessed[guessed.index("--W") + 1] = 64
    result = cli(*guessed)  # ... and the tiny file does not fit it
    assert result.exit_code == 2 and "does not fit the model with config" in result.output
    assert "configs/stable-diffusion/v2-1-stable-unclip-" in result.output

    for init, message in ((tmp_path / "missing.png", "init image not found"), (files["empty"], "holds no images")):
        bad = list(args)
        bad[1] = init
        result = cli(*bad)
        assert result.exit_code == 2 and message in result.output
    no_init = args[2:]
    result = cli(*no_init)
    assert result.exit_code == 2 and "--init-img" in result.output


def test_sdgen_command_line(files, tmp_path, sdgen_main) -> None:
    """The whole command line (``ldm.cli.app.main``: app registration included)."""
    args = ["unclip-variate", *_small(files, tmp_path / "out", "h", "--n_samples", 1)]
    code, out, err = sdgen_main(args, cwd=REPO)
    assert code == 0, err
    assert "Your samples are ready" in out
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
    code, out, err = sdgen_main(args[:1] + ["--noise-level", "2000", *args[1:]], cwd=REPO)
    assert code == 2 and err.strip().startswith("sdgen: error: --noise-level")


def test_txt2img_with_a_v_prediction_config(files, tmp_path) -> None:
    """``sdgen txt2img --config <SD 2.x v config>``: the core command runs v-models unchanged (any sampler)."""
    from ldm.cli.app import app

    runner = CliRunner()
    base = ["txt2img", "--config", SD2V_TINY, "--ckpt", str(files["sd2v"]), "--H", "32", "--W", "32", "--steps", "4",
            "--n_samples", "1", "--n_iter", "1", "--device", "cpu", "--prompt", "a red cube"]
    results = {}
    for sampler in ("ddim", "dpmpp_2m", "euler"):
        out = tmp_path / sampler
        result = runner.invoke(app, [*base, "--sampler", sampler, "--outdir", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        results[sampler] = _samples(out)[0]
        assert results[sampler].shape == (32, 32, 3)
    assert not np.array_equal(results["ddim"], results["euler"])
