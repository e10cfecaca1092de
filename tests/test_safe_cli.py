"""``sdgen safe-txt2img`` and the safety flags of every command, end to end on the tiny model (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ldm.cli.app import register
from ldm.output import load_manifest, png_pixels, read_parameters
from tests.safety_tiny import write_flag_all_checker

REPO = Path(__file__).resolve().parent.parent


def make_app() -> typer.Typer:
    """The sdgen commands involved, registered the way the ``sdgen`` app registers its commands."""
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app, "safe-txt2img", "ldm.cli.safe_txt2img:safe_txt2img")
    register(app, "txt2img", "ldm.cli.txt2img:txt2img")
    register(app, "replay", "ldm.cli.replay:replay")
    return app


def invoke(*args: object):
    return CliRunner().invoke(make_app(), [str(a) for a in args])


def assert_error(result, match: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def model_args(tiny_checkpoint: Path, tiny_config: Path) -> list[str]:
    return ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--device", "cpu",
            "--H", "16", "--W", "16", "--n_iter", "1", "--n_samples", "2"]


def samples(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


# ----------------------------------------------------------------------------- bad input


def test_unknown_preset_lists_valid_ones() -> None:
    assert_error(invoke("safe-txt2img", "x", "--sld", "extreme"),
                 "unknown SLD preset 'extreme'; valid presets: weak, medium, strong, max")


def test_bad_preset_file_names_fields(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("warmup_steps: ten\nguidance_scale: 100\nthreshold: 0.1\n")
    line = assert_error(invoke("safe-txt2img", "x", "--sld-config", cfg), str(cfg))
    assert "missing field(s) momentum_scale, momentum_beta" in line
    assert "'warmup_steps' must be an integer" in line
    assert_error(invoke("safe-txt2img", "x", "--sld-config", tmp_path / "none.yaml"), "not found")
    assert_error(invoke("safe-txt2img", "x", "--sld", "weak", "--sld-config", cfg), "not both")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--sld-momentum-beta", "1.0"], "momentum_beta must be in [0, 1), got 1.0"),
        (["--sld-mom-beta", "-0.2"], "momentum_beta must be in [0, 1), got -0.2"),
        (["--sld-guidance-scale", "-5"], "guidance_scale must be >= 0, got -5.0"),
        (["--sld", "max", "--sld-warmup-steps", "-1"], "warmup_steps must be >= 0"),
        (["--safety-concept", " "], "safety_concept must not be empty"),
    ],
)
def test_bad_values_exit_2(flags: list[str], match: str) -> None:
    assert_error(invoke("safe-txt2img", "x", *flags), match)


def test_missing_checker_weights(tmp_path: Path, model_args: list[str]) -> None:
    assert_error(invoke("txt2img", "x", *model_args, "--safety-checker", tmp_path / "absent.safetensors",
                        "--outdir", tmp_path / "o"), "safety-checker file not found")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def flag_all_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checker that flags every image."""
    return write_flag_all_checker(tmp_path_factory.mktemp("checker") / "flag-all.safetensors")


def test_safe_txt2img_end_to_end(tmp_path: Path, model_args: list[str], caplog) -> None:
    steps = ["--ddim_steps", "4"]
    plain = invoke("txt2img", "a red cube", *model_args, *steps, "--outdir", tmp_path / "plain")
    assert plain.exit_code == 0, plain.stderr
    safe = invoke("safe-txt2img", "a red cube", *model_args, *steps, "--sld", "max",
                  "--sld-guidance-scale", "3000", "--safety-concept", "violence, blood", "--outdir", tmp_path / "safe")
    assert safe.exit_code == 0, safe.stderr
    assert "ready and waiting" in safe.stdout
    base, guided = samples(tmp_path / "plain"), samples(tmp_path / "safe")
    assert len(guided) == 2 and (tmp_path / "safe" / "grid-0000.png").is_file()
    assert any(not np.array_equal(a, b) for a, b in zip(base, guided)), "SLD left the images unchanged"
    params = read_parameters(tmp_path / "safe" / "samples" / "00000.png")
    assert params["SLD"] == "max" and params["SLD guidance scale"] == "3000.0"
    assert params["SLD warmup steps"] == "0" and params["SLD threshold"] == "1.0"
    assert params["SLD momentum scale"] == "0.5" and params["SLD momentum beta"] == "0.7"
    assert params["Safety concept"] == "violence, blood" and params["Safety checker"] == "none"
    manifest = load_manifest(tmp_path / "safe" / "run-0000.json")
    assert manifest["command"] == "safe-txt2img" and manifest["status"] == "complete"
    assert manifest["options"]["sld"]["guidance_scale"] == 3000.0

    # SLD guidance scale 0: the authors' pipeline runs plain CFG, bit for bit the txt2img images
    off = invoke("safe-txt2img", "a red cube", *model_args, *steps, "--sld-guidance-scale", "0",
                 "--outdir", tmp_path / "off")
    assert off.exit_code == 0, off.stderr
    assert all(np.array_equal(a, b) for a, b in zip(base, samples(tmp_path / "off")))
    assert read_parameters(tmp_path / "off" / "samples" / "00000.png")["SLD"] == "medium (inactive)"

    # a replay of the SLD run gives the same pixels
    again = invoke("replay", tmp_path / "safe" / "run-0000.json", "--outdir", tmp_path / "replayed")
    assert again.exit_code == 0, again.stderr
    assert all(np.array_equal(a, b) for a, b in zip(guided, samples(tmp_path / "replayed")))


def test_safety_checker_in_every_command(tmp_path: Path, model_args: list[str], flag_all_checker: Path) -> None:
    for command in ("txt2img", "safe-txt2img"):
        out = tmp_path / command
        result = invoke(command, "a red cube", *model_args, "--ddim_steps", "2", "--safety-checker",
                        flag_all_checker, "--outdir", out)
        assert result.exit_code == 0, result.stderr
        for image in samples(out):
            assert image.max() == 0, "a flagged image must be saved black"
        assert read_parameters(out / "samples" / "00001.png")["Safety checker"] == "flagged"
        assert load_manifest(out / "run-0000.json")["safety"]["checker"] == str(flag_all_checker)
    off = invoke("txt2img", "a red cube", *model_args, "--ddim_steps", "2", "--safety-checker", flag_all_checker,
                 "--no-safety-checker", "--outdir", tmp_path / "off")
    assert off.exit_code == 0, off.stderr
    assert all(image.max() > 0 for image in samples(tmp_path / "off"))
    assert read_parameters(tmp_path / "off" / "samples" / "00000.png")["Safety checker"] == "none"


def test_watermark_flag(tmp_path: Path, model_args: list[str]) -> None:
    """Images under 256 px stay unmarked either way; the manifest records whether the mark was asked for."""
    for flag, expected in (([], "StableDiffusionV1"), (["--no-watermark"], None)):
        out = tmp_path / ("on" if not flag else "off")
        result = invoke("safe-txt2img", "x", *model_args, "--ddim_steps", "1", *flag, "--outdir", out)
        assert result.exit_code == 0, result.stderr
        assert load_manifest(out / "run-0000.json")["safety"]["watermark"] == expected


def test_command_line(tmp_path: Path, tiny_checkpoint: Path, tiny_config: Path, sdgen_main) -> None:
    args = ["safe-txt2img", "a red cube", "--ckpt", tiny_checkpoint, "--config", tiny_config, "--device", "cpu",
            "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--sld", "strong",
            "--outdir", "out"]
    code, out, err = sdgen_main(args, cwd=tmp_path)
    assert code == 0, err
    assert read_parameters(tmp_path / "out" / "samples" / "00000.png")["SLD"] == "strong"
