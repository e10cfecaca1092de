"""``sdgen txt2img`` with an unCLIP-L checkpoint (the Karlo prior) end to end on tiny random models (CPU): images,
records, per-image determinism, replay, sweeps, and one-line errors for bad prior files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.checkpoint import build_model_on_meta, load_config
from ldm.output import png_pixels, read_parameters
from tests.conftest import randomized_state_dict

REPO = Path(__file__).resolve().parent.parent
UNCLIP_L = str(REPO / "configs" / "tests" / "unclip-l-tiny.yaml")
PRIOR = str(REPO / "configs" / "tests" / "karlo-prior-tiny.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory, hash_cache_dir) -> dict[str, Path]:
    """A tiny unCLIP-L checkpoint (with its CLIP text half), one without it, a tiny prior with Karlo's statistics
    beside it, and files that are not what they claim."""
    root = tmp_path_factory.mktemp("prior-cli")
    out: dict[str, Path] = {}
    unclip = randomized_state_dict(build_model_on_meta(load_config(UNCLIP_L)), seed=2)
    out["unclip"] = root / "unclip-l.safetensors"
    save_file(unclip, str(out["unclip"]))
    text = ("embedder.model.transformer.", "embedder.model.token_embedding", "embedder.model.positional_embedding",
            "embedder.model.ln_final", "embedder.model.text_projection")
    out["no_text"] = root / "unclip-l-visual-only.safetensors"
    save_file({k: v for k, v in unclip.items() if not k.startswith(text)}, str(out["no_text"]))
    out["clip_text"] = root / "clip-text.safetensors"  # the text half as a plain CLIP state dict
    save_file({k[len("embedder.model."):]: v for k, v in unclip.items() if k.startswith(text)}, str(out["clip_text"]))
    (root / "karlo").mkdir()
    out["prior"] = root / "karlo" / "prior.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(PRIOR)), seed=3), str(out["prior"]))
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(1, 16, generator=g) * 0.1, torch.rand(1, 16, generator=g) + 0.5),
               root / "karlo" / "ViT-L-14_stats.th")
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(out["prior"].read_bytes()[:5000])
    out["empty"] = root / "empty.ckpt"
    out["empty"].write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def cli():
    from ldm.cli.app import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app, "txt2img", "ldm.cli.txt2img:txt2img")
    register(app, "replay", "ldm.cli.replay:replay")
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*map(str, args)], catch_exceptions=False)


def small(files, outdir, *extra):
    return ["txt2img", "a red cube", "--ckpt", files["unclip"], "--config", UNCLIP_L, "--prior", files["prior"],
            "--prior-config", PRIOR, "--H", 32, "--W", 32, "--steps", 4, "--prior-steps", 5, "--n_samples", 2,
            "--n_iter", 1, "--outdir", outdir, "--device", "cpu", "--no-watermark", *extra]


def samples(outdir: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((outdir / "samples").glob("*.png"))]


def test_text_to_image_records_the_prior_and_regenerates_each_image_alone(cli, files, tmp_path):
    result = cli(*small(files, tmp_path / "a"))
    assert result.exit_code == 0, result.output
    images = samples(tmp_path / "a")
    assert len(images) == 2 and not np.array_equal(images[0], images[1])
    params = read_parameters(sorted((tmp_path / "a" / "samples").glob("*.png"))[0])
    assert params["Prior"].startswith("prior [") and params["Prior steps"] == "5" and params["Prior scale"] == "4.0"
    assert params["Noise level"] == "0"
    manifest = json.loads((tmp_path / "a" / "run-0000.json").read_text())
    assert manifest["prior"]["clip_stats"].endswith("ViT-L-14_stats.th")  # found beside the prior
    assert manifest["settings"]["prior_steps"] == 5 and manifest["notices"] == []
    # image 1 of seed 42 is image 0 of seed 43 alone: its prior noise is its own (up to the rounding of batched
    # kernels, as for every family: tests/test_pipeline.py)
    assert cli(*small(files, tmp_path / "b", "--seed", 43, "--n_samples", 1)).exit_code == 0
    assert np.abs(samples(tmp_path / "b")[0].astype(int) - images[1].astype(int)).max() <= 1
    # a replay of the manifest gives the same pixels
    assert cli("replay", tmp_path / "a" / "run-0000.json", "--outdir", tmp_path / "c").exit_code == 0
    assert all(np.array_equal(x, y) for x, y in zip(samples(tmp_path / "c"), images))
    # the PNG alone runs again too (the checkpoints found by their hashes, their configs beside them)
    for path, config in ((files["unclip"], UNCLIP_L), (files["prior"], PRIOR)):
        path.with_suffix(".yaml").write_text(Path(config).read_text())
    png = sorted((tmp_path / "a" / "samples").glob("*.png"))[1]
    result = cli("replay", png, "--models-dir", files["unclip"].parent, "--outdir", tmp_path / "p", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert np.abs(samples(tmp_path / "p")[0].astype(int) - images[1].astype(int)).max() <= 1  # made alone
    # --resume makes a lost image again, bit for bit
    lost = sorted((tmp_path / "c" / "samples").glob("*.png"))[1]
    lost.unlink()
    assert cli(*small(files, tmp_path / "c", "--resume")).exit_code == 0
    assert np.array_equal(png_pixels(lost), images[1])


def test_the_prior_conditions_the_image(cli, files, tmp_path):
    """Another prior scale (a sweep) or no statistics change the embedding and so the image; the text prompt of
    the decoder alone does not explain them."""
    assert cli(*small(files, tmp_path / "s", "--n_samples", 1, "--sweep", "prior_scale=1,4")).exit_code == 0
    one, four = samples(tmp_path / "s")
    assert not np.array_equal(one, four)
    stats = tmp_path / "stats.th"
    torch.save((torch.full((1, 16), 3.0), torch.full((1, 16), 2.0)), stats)
    assert cli(*small(files, tmp_path / "t", "--n_samples", 1, "--clip-stats", stats)).exit_code == 0
    assert not np.array_equal(samples(tmp_path / "t")[0], four)


def test_a_checkpoint_without_the_text_tower_takes_prior_clip(cli, files, tmp_path):
    args = small(files, tmp_path / "n", "--n_samples", 1)
    args[args.index(files["unclip"])] = files["no_text"]
    result = cli(*args)
    assert result.exit_code == 2 and "--prior-clip" in result.output
    assert cli(*args, "--prior-clip", files["clip_text"]).exit_code == 0
    assert cli(*small(files, tmp_path / "w", "--n_samples", 1)).exit_code == 0
    assert np.array_equal(samples(tmp_path / "n")[0], samples(tmp_path / "w")[0])  # the same weights, the same image


def _error(cli, files, tmp_path, *extra, swap=None):
    args = small(files, tmp_path / "e", *extra)
    for old, new in (swap or {}).items():
        args[args.index(old)] = new
    result = cli(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("sdgen: error")]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "e" / "samples").exists() or not any((tmp_path / "e" / "samples").iterdir())
    return lines[0]


def test_bad_prior_files_are_one_line_errors(cli, files, tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(REPO / "configs/tests/sd1-tiny.yaml"))), str(sd1))
    assert "not the Karlo prior" in _error(cli, files, tmp_path, swap={files["prior"]: sd1})
    assert "truncated" in _error(cli, files, tmp_path, swap={files["prior"]: files["truncated"]})
    assert "empty" in _error(cli, files, tmp_path, swap={files["prior"]: files["empty"]})
    assert "not found" in _error(cli, files, tmp_path, swap={files["prior"]: tmp_path / "nothing.ckpt"})
    assert "--clip-stats not found" in _error(cli, files, tmp_path, "--clip-stats", tmp_path / "none.th")
    wide = tmp_path / "wide-text.safetensors"
    tower = build_model_on_meta(load_config(UNCLIP_L)).embedder.model
    save_file({"token_embedding.weight": torch.zeros(49408, 24), "ln_final.weight": torch.ones(24),
               "ln_final.bias": torch.zeros(24), "text_projection": torch.zeros(24, 16),
               "positional_embedding": torch.zeros(77, 24)}, str(wide))
    assert tower.ln_final.weight.shape[0] == 32
    assert "24 wide" in _error(cli, files, tmp_path, "--prior-clip", wide)
    assert "--prior-steps" in _error(cli, files, tmp_path, "--prior-steps", 0)
    assert "--prior-scale" in _error(cli, files, tmp_path, "--prior-scale", 0)


def test_torchscript_text_tower_is_refused_with_the_conversion(files, tmp_path):
    from ldm.errors import SdgenError
    from ldm.models.prior.files import clip_text_entries

    scripted = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(SdgenError, match="TorchScript archive.*torch.jit.load"):
        clip_text_entries(scripted)


def test_unclip_h_and_other_models_refuse_the_prior(cli, files, tmp_path):
    from types import SimpleNamespace

    from ldm.errors import SdgenError
    from ldm.models.prior.files import plan_prior

    h = load_config(REPO / "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml")
    opts = SimpleNamespace(prior=None, prior_config=None, prior_clip=None, clip_stats=None)
    with pytest.raises(SdgenError, match="1024-d image embeddings.*unCLIP-H.*sd21-unclip-l"):
        plan_prior(opts, h, {})
    sd1 = tmp_path / "sd1.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(REPO / "configs/tests/sd1-tiny.yaml"))), str(sd1))
    result = cli("txt2img", "x", "--ckpt", sd1, "--config", REPO / "configs/tests/sd1-tiny.yaml", "--prior-steps", 10,
                 "--H", 16, "--W", 16, "--outdir", tmp_path / "o")
    assert result.exit_code == 2 and "unCLIP-L checkpoint" in result.output


def test_a_long_prompt_is_cut_for_the_prior_with_a_warning(caplog):
    from ldm.models.prior.text import karlo_tokens

    with caplog.at_level(logging.WARNING):
        ids, mask = karlo_tokens(["word " * 100, "short"])
    assert mask[0].all() and int(ids[0, -1]) == 49407 and int(mask[1].sum()) == 3
    assert "Karlo prior reads the first 75 tokens" in caplog.text


def test_the_prior_runs_in_bf16(cli, files, tmp_path):
    """--precision bf16 gives the prior bfloat16 weights (LayerNorms still compute in float32): the run works and
    the prior's prediction stays within bf16 rounding of the float32 one."""
    from ldm.models.prior.karlo import KarloPrior

    assert cli(*small(files, tmp_path / "bf16", "--n_samples", 1, "--precision", "bf16")).exit_code == 0
    prior = KarloPrior(xf_width=32, xf_layers=2, xf_heads=2, clip_dim=16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x, t = torch.randn(2, 16, generator=g), torch.tensor([999, 10])
        text, seq, mask = torch.randn(2, 16, generator=g), torch.randn(2, 77, 16, generator=g), torch.ones(2, 77).bool()
        full = prior.model.step(x, t, prior.model.encode_text(text, seq, mask))
        prior.to(torch.bfloat16)
        half = prior.model.step(x, t, prior.model.encode_text(text, seq, mask))
    assert half.dtype == torch.float32
    assert float((half - full).abs().max() / full.abs().max()) < 3e-2
