"""``sdxl-refine --low-memory``: base and refiner are never in memory together, and the images are the same."""

from __future__ import annotations

import gc
import weakref

import numpy as np
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.generation import run as run_module
from ldm.output import png_pixels
from tests.sdxl_tiny import SIZE, TINY_CONFIGS, write_tiny_checkpoint


def test_low_memory_loads_one_model_at_a_time_and_changes_no_pixel(tmp_path, monkeypatch):
    base = write_tiny_checkpoint("base", tmp_path / "base.safetensors")
    refiner = write_tiny_checkpoint("refiner", tmp_path / "refiner.safetensors")
    args = ["sdxl-refine", "a lighthouse", "--ckpt", base, "--refiner-ckpt", refiner, "--config", TINY_CONFIGS["base"],
            "--refiner-config", TINY_CONFIGS["refiner"], "--H", SIZE, "--W", SIZE, "--steps", "4", "--n_samples", "2",
            "--n_iter", "2", "--high-noise-frac", "0.5", "--device", "cpu", "--sampler", "euler_ancestral"]
    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    original = run_module.load_run_model

    def counting(spec, plan):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model = original(spec, plan)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(run_module, "load_run_model", counting)
    low = CliRunner().invoke(app, [str(a) for a in args + ["--low-memory", "--outdir", tmp_path / "low"]])
    assert low.exit_code == 0, (low.stderr, low.exception)
    assert alive_at_load == [0, 0]  # the refiner loads after the base is gone
    assert len(loaded) == 2
    plain = CliRunner().invoke(app, [str(a) for a in args + ["--outdir", tmp_path / "plain"]])
    assert plain.exit_code == 0, plain.stderr
    assert alive_at_load[2:] == [0, 1]  # without it, both are loaded together
    low_images = sorted((tmp_path / "low" / "samples").glob("*.png"))
    plain_images = sorted((tmp_path / "plain" / "samples").glob("*.png"))
    assert len(low_images) == len(plain_images) == 4
    for a, b in zip(low_images, plain_images):
        np.testing.assert_array_equal(png_pixels(a), png_pixels(b))


def test_low_memory_is_refused_outside_sdxl_refine(tmp_path):
    result = CliRunner().invoke(app, ["txt2img", "a cube", "--low-memory", "--outdir", str(tmp_path)])
    assert result.exit_code == 2 and "--low-memory" in result.output
