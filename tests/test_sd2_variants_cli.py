"""``sdgen inpaint`` / ``depth2img`` / ``upscale`` end to end on tiny random models (CPU): the one generation path
with per-image seeds, batches, prompt files, resume, SLD, PNG parameters, manifests and replay, and one-line
errors for bad input."""

from __future__ import annotations

import csv
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
from tests.conftest import randomized_state_dict

REPO = Path(__file__).resolve().parent.parent
TINY = {name: str(REPO / "configs" / "tests" / f"{name}-tiny.yaml")
        for name in ("sd2-inpaint", "sd2-depth", "x4-upscaler", "sd2v")}
COMMANDS = {"inpaint": "ldm.cli.inpaint:inpaint", "depth2img": "ldm.cli.depth2img:depth2img",
            "upscale": "ldm.cli.upscale:upscale", "txt2img": "ldm.cli.txt2img:txt2img",
            "replay": "ldm.cli.replay:replay"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, hash_cache_dir) -> dict[str, Path]:
    """Tiny checkpoints, an image, masks and depth maps."""
    root = tmp_path_factory.mktemp("sd2-variants")
    out: dict[str, Path] = {}
    for name, cfg in TINY.items():
        out[name] = root / f"{name}.safetensors"
        save_file(randomized_state_dict(build_model_on_meta(load_config(cfg)), seed=3), str(out[name]))
        (root / f"{name}.yaml").write_text(Path(cfg).read_text())  # found beside the file by a PNG replay
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / "small.png")
    for name, rows in (("mask.png", slice(8, 24)), ("mask2.png", slice(0, 8))):
        mask = np.zeros((32, 32), np.uint8)
        mask[rows, 8:24] = 255
        Image.fromarray(mask).save(root / name)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "mask-small.png")
    depth = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(depth).save(root / "depth.png")
    Image.fromarray(depth[:16]).save(root / "depth-small.png")
    (root / "notes.txt").write_text("not an image")
    out.update({k: root / f"{k}.png" for k in ("image", "small", "mask", "mask2", "mask-small", "depth", "depth-small")})
    out["notes"] = root / "notes.txt"
    return out


@pytest.fixture(scope="module")
def cli():
    from ldm.cli.app import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    for name, spec in COMMANDS.items():
        register(app, name, spec)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*map(str, args)], catch_exceptions=False)


def _args(files, command: str, outdir: Path, *extra) -> list:
    model = {"inpaint": "sd2-inpaint", "depth2img": "sd2-depth", "upscale": "x4-upscaler"}[command]
    inputs = {"inpaint": ["--init-img", files["image"], "--mask", files["mask"]],
              "depth2img": ["--init-img", files["image"]], "upscale": ["--init-img", files["small"]]}[command]
    return [command, "a red cube", *inputs, "--config", TINY[model], "--ckpt", files[model], "--steps", 4,
            "--outdir", outdir, "--device", "cpu", *extra]


def _samples(outdir: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((outdir / "samples").glob("*.png"))]


@pytest.mark.parametrize("command, size, field", [("inpaint", (32, 32), "Mask"), ("depth2img", (32, 32), None),
                                                  ("upscale", (64, 96), "Noise level")])
def test_each_command_runs_with_seeds_batches_and_records(cli, files, tmp_path, command, size, field) -> None:
    result = cli(*_args(files, command, tmp_path / "a", "--n_samples", 2))
    assert result.exit_code == 0, result.output
    images = _samples(tmp_path / "a")
    assert len(images) == 2 and images[0].shape == (*size, 3) and not np.array_equal(images[0], images[1])
    params = read_parameters(tmp_path / "a" / "samples" / "00001.png")
    assert params["Seed"] == "1" and params["Init image"] == Path(files["image" if command != "upscale" else "small"]).name
    if field:
        assert field in params
    manifest = json.loads((tmp_path / "a" / "run-0000.json").read_text())
    assert manifest["command"] == command and manifest["status"] == "complete"
    assert len(manifest["init_images"]) == 1 and len(manifest["init_images"][0]["sha256"]) == 64
    # image 1 alone (seed 1): the same pixels as in the batch, up to batched-kernel rounding (1 level)
    assert cli(*_args(files, command, tmp_path / "b", "--seed", 1)).exit_code == 0
    alone = _samples(tmp_path / "b")[0]
    assert np.abs(alone.astype(int) - images[1].astype(int)).max() <= 1


def test_inpainting_model_defaults_and_header(cli, files, tmp_path) -> None:
    from ldm.defaults import defaults_for

    d = defaults_for("inpaint", "inpaint")
    assert (d["steps"], d["scale"], d["sampler"], d["seed"], d["n_samples"]) == (50, 10.0, "ddim", 0, 1)
    d = defaults_for("upscale", "upscale")
    assert (d["steps"], d["scale"], d["noise_level"], d["prompt"]) == (50, 9.0, 20, "a high quality professional photograph")
    assert defaults_for("depth2img", "depth")["strength"] == 0.9
    assert cli(*_args(files, "inpaint", tmp_path / "a")).exit_code == 0
    notes = json.loads((tmp_path / "a" / "run-0000.json").read_text())["run_notes"]
    assert any("own mask input" in note for note in notes)
    ordinary = cli("inpaint", "a red cube", "--init-img", files["image"], "--mask", files["mask"], "--config",
                   TINY["sd2v"], "--ckpt", files["sd2v"], "--steps", 4, "--outdir", tmp_path / "b")
    assert ordinary.exit_code == 0, ordinary.output
    notes = json.loads((tmp_path / "b" / "run-0000.json").read_text())["run_notes"]
    assert any("blended in at each step" in note for note in notes)


def test_known_region_converges_to_the_known_latent() -> None:
    """Inpainting with an ordinary model: whatever the denoiser says, the known region ends at the known latent."""
    from ldm.models.diffusion.concat_conditioners import KnownRegionDenoiser
    from ldm.sampling.grids import final_latent, initial_x, sampler_sigmas
    from ldm.sampling.samplers import SAMPLERS

    g = torch.Generator().manual_seed(0)
    z0, noise, x_t = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1.0
    seen = []

    def denoiser(x, sigma, cond):
        seen.append(x.clone())
        return torch.full_like(x, 0.5)  # a "model" that ignores its input

    cond = {"known_latent": z0, "known_keep": keep, "known_noise": noise}
    alphas = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        seen.clear()
        sigmas = sampler_sigmas(sampler, alphas, 10)
        out = final_latent(SAMPLERS[sampler](KnownRegionDenoiser(denoiser), initial_x(x_t, sigmas), sigmas,
                                             extra_args={"cond": cond}), sigmas)
        assert torch.allclose(out[..., :4], z0[..., :4], atol=0.02 * float(z0.abs().max()))
        assert torch.allclose(out[..., 4:], torch.full_like(out[..., 4:], 0.5), atol=0.05)  # sigma_min residue
        # the network saw the known region noised to its sigma: z0 + sigma * noise
        assert torch.allclose(seen[0][..., :4], (z0 + float(sigmas[0]) * noise)[..., :4], rtol=1e-5, atol=1e-5)


def test_prompt_file_lines_bring_their_own_image_and_mask(cli, files, tmp_path) -> None:
    table = tmp_path / "lines.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "init_img", "mask", "seed"])
        writer.writerow(["a red cube", files["image"], files["mask"], 5])
        writer.writerow(["a red cube", files["image"], files["mask2"], 5])
    result = cli("inpaint", "--from-file", table, "--init-img", files["image"], "--mask", files["mask"], "--config",
                 TINY["sd2-inpaint"], "--ckpt", files["sd2-inpaint"], "--steps", 4, "--outdir", tmp_path / "f")
    assert result.exit_code == 0, result.output
    first, second = _samples(tmp_path / "f")
    assert not np.array_equal(first, second)  # same seed and prompt: only the mask differs
    assert read_parameters(tmp_path / "f" / "samples" / "00001.png")["Mask"] == "mask2.png"
    manifest = json.loads((tmp_path / "f" / "run-0000.json").read_text())
    assert [Path(i["extra"]).name for i in manifest["init_images"]] == ["mask.png", "mask2.png"]


def test_resume_and_replay_reproduce_the_images(cli, files, tmp_path) -> None:
    from ldm.generation.run import replay_manifest

    out = tmp_path / "r"
    assert cli(*_args(files, "inpaint", out, "--n_samples", 1, "--n_iter", 2)).exit_code == 0
    first = _samples(out)
    (out / "samples" / "00001.png").unlink()
    assert cli(*_args(files, "inpaint", out, "--n_samples", 1, "--n_iter", 2, "--resume")).exit_code == 0
    assert all(np.array_equal(a, b) for a, b in zip(first, _samples(out)))
    replay_manifest(out / "run-0000.json", outdir=str(tmp_path / "again"))
    assert all(np.array_equal(a, b) for a, b in zip(first, _samples(tmp_path / "again")))


def test_png_replay_asks_for_the_inputs_and_reproduces(cli, files, tmp_path) -> None:
    out = tmp_path / "p"
    assert cli(*_args(files, "inpaint", out)).exit_code == 0
    png = out / "samples" / "00000.png"
    refused = cli("replay", png, "--ckpt", files["sd2-inpaint"], "--outdir", tmp_path / "q")
    assert refused.exit_code == 2 and "--init-img and --mask" in refused.output
    again = cli("replay", png, "--ckpt", files["sd2-inpaint"], "--outdir", tmp_path / "q", "--init-img", files["image"],
                "--mask", files["mask"])
    assert again.exit_code == 0, again.output
    assert np.array_equal(_samples(out)[0], _samples(tmp_path / "q")[0])


def test_sld_runs_on_inpainting(cli, files, tmp_path) -> None:
    result = cli(*_args(files, "inpaint", tmp_path / "s", "--sld", "max"))
    assert result.exit_code == 0, result.output
    plain = cli(*_args(files, "inpaint", tmp_path / "p"))
    assert plain.exit_code == 0
    assert not np.array_equal(_samples(tmp_path / "s")[0], _samples(tmp_path / "p")[0])
    assert "SLD" in "".join(read_parameters(tmp_path / "s" / "samples" / "00000.png"))


def test_depth_map_replaces_midas(cli, files, tmp_path) -> None:
    assert cli(*_args(files, "depth2img", tmp_path / "m")).exit_code == 0
    result = cli(*_args(files, "depth2img", tmp_path / "d", "--depth-map", files["depth"]))
    assert result.exit_code == 0, result.output
    assert not np.array_equal(_samples(tmp_path / "m")[0], _samples(tmp_path / "d")[0])
    assert read_parameters(tmp_path / "d" / "samples" / "00000.png")["Depth map"] == "depth.png"


def test_depth_strength_one_starts_from_pure_noise_one_step_short(cli, files, tmp_path) -> None:
    """The depth2img script: t_enc = min(int(strength * steps), steps - 1); at 1.0 pure noise (do_full_sample)."""
    for strength in ("0.9", "1.0"):
        assert cli(*_args(files, "depth2img", tmp_path / strength, "--strength", strength)).exit_code == 0
        stage = json.loads((tmp_path / strength / "run-0000.json").read_text())["stages"][0]
        assert stage["timesteps"] == [501, 251, 1]  # 4 steps: 3 run, the first one grid point below t_enc
    assert not np.array_equal(_samples(tmp_path / "0.9")[0], _samples(tmp_path / "1.0")[0])


@pytest.mark.parametrize("command, extra, message", [
    ("inpaint", ["--mask", "mask-small"], "must have the same size"),
    ("inpaint", ["--mask", "notes"], "not an image"),
    ("depth2img", ["--depth-map", "depth-small"], "must have the same size"),
    ("upscale", ["--noise-level", "400"], "0..349"),
    ("inpaint", [], "inpaint needs a mask"),
])
def test_bad_input_is_one_line_exit_2(cli, files, tmp_path, command, extra, message) -> None:
    args = _args(files, command, tmp_path / "x")
    if command == "inpaint":
        args = [a for a in args if a not in ("--mask", files["mask"])]
    extra = [files[e] if e in files else e for e in extra]
    result = cli(*args, *extra)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("sdgen: error")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_wrong_model_for_the_command(cli, files, tmp_path) -> None:
    result = cli("depth2img", "x", "--init-img", files["image"], "--config", TINY["sd2v"], "--ckpt", files["sd2v"],
                 "--outdir", tmp_path / "w")
    assert result.exit_code == 2 and "needs a depth-to-image model" in result.output


def test_untiled_upscale_that_would_not_fit_is_refused_before_loading(cli, files, tmp_path, monkeypatch) -> None:
    import ldm.generation.plan as plan

    monkeypatch.setattr(plan, "available_memory", lambda: 1 << 20)
    result = cli(*_args(files, "upscale", tmp_path / "u"))
    assert result.exit_code == 2 and "--tile" in result.output and "GiB" in result.output
