"""The flag declarations of each generation command (ldm.cli.options): spellings, and help texts that state what
the command really does, their defaults taken from the one defaults table (ldm.defaults)."""

from __future__ import annotations

import pytest
import typer

from ldm.checkpoint import load_config
from ldm.cli.app import register
from ldm.defaults import describe
from ldm.model_files import latent_size_multiple, vae_downsampling_factor

COMMANDS = {
    "txt2img": "ldm.cli.txt2img:txt2img",
    "img2img": "ldm.cli.img2img:img2img",
    "safe-txt2img": "ldm.cli.safe_txt2img:safe_txt2img",
    "unclip-variate": "ldm.cli.unclip_variate:unclip_variate",
    "sdxl-refine": "ldm.cli.sdxl_refine:sdxl_refine",
}
SD_CONFIGS = (
    "configs/stable-diffusion/v1-inference.yaml",
    "configs/stable-diffusion/v2-inference-v.yaml",
    "configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml",
    "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml",
)


@pytest.fixture(scope="module")
def params() -> dict[str, dict[str, object]]:
    """command -> flag name -> the parameter object typer builds from the command function."""
    app = typer.Typer()
    for name, spec in COMMANDS.items():
        register(app, name, spec)
    group = typer.main.get_command(app)
    return {name: {p.name: p for p in group.commands[name].params} for name in COMMANDS}


def test_size_help_states_the_multiple_the_models_need(params):
    """--H / --W must be multiples of VAE factor x UNet downsampling (what the plan enforces): 64 for every
    SD 1.x / 2.x config, 32 for the SDXL base, 64 for the SDXL refiner."""
    for config in SD_CONFIGS:
        cfg = load_config(config)
        assert (vae_downsampling_factor(cfg), latent_size_multiple(cfg)) == (8, 64), config
    assert latent_size_multiple(load_config("configs/sdxl/sd_xl_base.yaml")) == 32
    assert latent_size_multiple(load_config("configs/sdxl/sd_xl_refiner.yaml")) == 64
    for command in COMMANDS:
        for side in ("height", "width"):
            text = params[command][side].help
            assert "of --f" not in text and "multiple of 8" not in text, (command, text)
            assert "a multiple of 64" in text and "VAE factor 8 x UNet downsampling 8" in text, (command, text)
    for command in ("txt2img", "img2img", "safe-txt2img"):
        assert "32 for the SDXL base" in params[command]["height"].help
    assert "refiner" in params["sdxl-refine"]["height"].help


def test_sampler_help_fits_each_command(params):
    for command in ("txt2img", "img2img", "safe-txt2img"):  # an SDXL config takes the SGM demo's Euler
        assert "default ddim; euler for SDXL; dpmpp_2m for the demo model" in params[command]["sampler"].help
    text = params["unclip-variate"]["sampler"].help  # SD 2.x only
    assert "SDXL" not in text and "demo" not in text and "default ddim" in text and "--plms" in text
    text = params["sdxl-refine"]["sampler"].help
    assert "default euler" in text and "--plms" not in text  # sdxl-refine has no --plms / --dpm_solver
    for command in COMMANDS:
        assert "dpmpp_2m" in params[command]["sampler"].help


def test_step_flag_spellings_are_the_same_in_every_command(params):
    for command in COMMANDS:
        assert set(params[command]["steps"].opts) == {"--steps", "--ddim_steps", "--ddim-steps"}, command


@pytest.mark.parametrize("command", list(COMMANDS))
def test_shown_defaults_come_from_the_defaults_table(params, command):
    """Every flag whose default lives in ldm.defaults shows exactly the table's text: the help cannot drift."""
    checked = 0
    for field in ("steps", "scale", "n_iter", "n_samples", "seed", "outdir", "strength", "height"):
        expected = describe(command, field)
        if expected is None or field not in params[command]:
            continue
        shown = params[command][field].show_default
        assert shown == expected or (isinstance(shown, str) and shown.startswith(expected)), (command, field, shown)
        assert params[command][field].default is None  # unset: the plan fills it from the table
        checked += 1
    assert checked >= 5


def test_demo_scale_in_the_help_is_the_demo_config_value(params):
    demo_scale = load_config("configs/demo/shapes-ldm.yaml").sampling_defaults.scale
    assert f"{demo_scale} for the demo model" in params["txt2img"]["scale"].show_default


def test_readme_flag_tables_are_the_live_help():
    """The README's tables are generated from the commands' declarations (scripts/readme_flags.py): a flag or a
    default changed without regenerating them fails here."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "readme_flags.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
