"""Shared fixtures: a tiny SD 1.x checkpoint with random weights, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tests" / "sd1-tiny.yaml"

# The test models are tiny: thousands of small kernels, where intra-op thread pools cost more than they
# save (and oversubscribe a shared machine). SDGEN_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SDGEN_TEST_THREADS", "1")))


def pytest_report_header(config) -> list[str]:
    """Which CPU the suite runs on, and how the recorded regression images are compared here (bit for bit on the
    recording platform, else within the cross-CPU bounds of tests/test_regression_images.py)."""
    import json

    from tests.regression_images import RECORDED, platform_key
    from tests.tolerance import cpu_description

    same = json.loads((RECORDED / "platform.json").read_text()) == platform_key()
    how = ("bit for bit (this is the recording platform)" if same
           else "within the cross-CPU bounds (recorded on another CPU, torch build or thread count)")
    return [f"sdgen: {cpu_description()}", f"sdgen: recorded regression images compared {how}"]


def randomized_state_dict(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> dict[str, torch.Tensor]:
    """The model's state_dict with every float parameter redrawn (keys in sorted order, one generator).

    A freshly built UNet has zero-initialised output layers (its prediction would ignore the prompt), so
    the test weights are random: N(0, std^2), except normalisation scales, N(1, std^2), which keep
    activations at unit size so that the prompt visibly changes the image. Buffers keep their values.
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_scales = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, norm_types)
    }
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for key, value in sorted(model.state_dict().items()):
        if key in params and value.is_floating_point():
            value = torch.randn(value.shape, generator=g, dtype=torch.float32) * std
            if key in norm_scales:
                value = value + 1.0
        out[key] = value.detach().to("cpu").clone().contiguous()
    return out


@pytest.fixture(scope="session")
def hash_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep checkpoint-hash caches of the tests out of the user's ~/.cache (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("sdgen-cache")
    previous = os.environ.get("SDGEN_CACHE_DIR")
    os.environ["SDGEN_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SDGEN_CACHE_DIR", None)
    else:
        os.environ["SDGEN_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, hash_cache_dir: Path) -> Path:
    """``sd1-tiny.safetensors``: the tiny config's model with seeded random weights."""
    from safetensors.torch import save_file

    from ldm.checkpoint import build_model_on_meta, load_config

    model = build_model_on_meta(load_config(TINY_CONFIG))  # parameters on meta (only shapes are needed)
    path = tmp_path_factory.mktemp("tiny-model") / "sd1-tiny.safetensors"
    save_file(randomized_state_dict(model), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The tiny model loaded from :func:`tiny_checkpoint` on the CPU (shared, read-only)."""
    from ldm.checkpoint import load_model

    return load_model(TINY_CONFIG, tiny_checkpoint, device="cpu")


@pytest.fixture
def sdgen_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run the whole ``sdgen`` command line in this process (``ldm.cli.app.main``: every command registered, the
    one-line error contract), in a working directory: ``(exit code, stdout, stderr)``. One test
    (tests/test_cli.py) runs the installed ``sdgen`` as a subprocess; the others use this, which is seconds faster."""
    from ldm.cli.app import main

    def run(args, cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run
