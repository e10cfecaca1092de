"""Recorded images of sdgen's commands, to prove that a change of structure changes no pixel.

Each case is one ``sdgen`` command line (run in-process): the bundled demo model through every sampler, img2img
and SLD, and the tiny test configs of SD 1.x, SD 2.x (v), unCLIP-L/-H and SDXL (base, base -> refiner, refiner
SDEdit) with seeded random weights. The samples of a case are stacked top to bottom into one PNG under
``tests/data/regression/``. ``python -m tests.regression_images`` records them (do that only when a change of
pixels is intended, and say why in the commit); ``tests/test_regression_images.py`` compares.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RECORDED = REPO / "tests" / "data" / "regression"
TINY = REPO / "configs" / "tests"
DEMO = ["--device", "cpu", "--no-watermark"]

# name -> (command line; {placeholder}s: {tmp}, {sd1}, {sd2v}, {unclip_l}, {unclip_h}, {base}, {refiner}, {stats},
# {shape_png}, {noise_png}, {prompts})
CASES: dict[str, list[str]] = {
    **{f"demo-{s}": ["txt2img", "a red circle on a white background", "--sampler", s, "--steps", "10",
                     "--n_samples", "2", "--seed", "1", *DEMO] for s in
       ("ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral", "heun")},
    "demo-ddim-eta": ["txt2img", "a blue square", "--eta", "0.5", "--steps", "10", "--sampler", "ddim",
                      "--n_samples", "2", *DEMO],
    "demo-fixed-code": ["txt2img", "a green triangle", "--fixed_code", "--n_iter", "2", "--n_samples", "2",
                        "--steps", "8", *DEMO],
    "demo-from-file": ["txt2img", "--from-file", "{prompts}", "--n_samples", "2", "--negative-prompt", "red",
                       "--steps", "8", "--seed", "7", *DEMO],
    "demo-scale-1": ["txt2img", "a yellow circle", "--scale", "1.0", "--steps", "8", "--n_samples", "1", *DEMO],
    "demo-img2img-ddim": ["img2img", "a blue circle", "--init-img", "{shape_png}", "--strength", "0.6",
                          "--steps", "10", "--sampler", "ddim", "--n_samples", "2", *DEMO],
    "demo-img2img-euler": ["img2img", "a blue circle", "--init-img", "{shape_png}", "--strength", "0.5",
                           "--steps", "10", "--sampler", "euler", "--n_samples", "1", *DEMO],
    "demo-img2img-full": ["img2img", "a green square", "--init-img", "{shape_png}", "--strength", "1.0",
                          "--steps", "6", "--n_samples", "1", *DEMO],
    "demo-sld-medium": ["safe-txt2img", "a red circle", "--steps", "10", "--n_samples", "2", *DEMO],
    "demo-sld-max-plms": ["safe-txt2img", "a red circle", "--sld", "max", "--sld-warmup-steps", "2", "--plms",
                          "--steps", "10", "--n_samples", "1", *DEMO],
    "sd1-bf16": ["txt2img", "a red cube", "--config", f"{TINY}/sd1-tiny.yaml", "--ckpt", "{sd1}", "--H", "16",
                 "--W", "16", "--steps", "4", "--n_samples", "2", "--n_iter", "1", "--precision", "bf16", *DEMO],
    "sd1-dpm-solver": ["txt2img", "a red cube", "--config", f"{TINY}/sd1-tiny.yaml", "--ckpt", "{sd1}", "--H", "16",
                       "--W", "24", "--steps", "5", "--dpm_solver", "--n_samples", "2", "--n_iter", "1", *DEMO],
    "sd2v-ddim": ["txt2img", "a red cube", "--config", f"{TINY}/sd2v-tiny.yaml", "--ckpt", "{sd2v}", "--H", "32",
                  "--W", "32", "--steps", "4", "--n_samples", "2", "--n_iter", "1", *DEMO],
    "sd2v-euler-a": ["txt2img", "a red cube", "--config", f"{TINY}/sd2v-tiny.yaml", "--ckpt", "{sd2v}", "--H", "32",
                     "--W", "32", "--steps", "4", "--sampler", "euler_ancestral", "--n_samples", "2", "--n_iter", "1",
                     *DEMO],
    "sd2v-img2img": ["img2img", "a red cube", "--config", f"{TINY}/sd2v-tiny.yaml", "--ckpt", "{sd2v}",
                     "--init-img", "{noise_png}", "--steps", "5", "--strength", "0.8", "--n_samples", "1", *DEMO],
    "sd2v-sld": ["safe-txt2img", "a red cube", "--config", f"{TINY}/sd2v-tiny.yaml", "--ckpt", "{sd2v}", "--H", "32",
                 "--W", "32", "--steps", "5", "--sld-warmup-steps", "1", "--sld-guidance-scale", "50",
                 "--sld-threshold", "0.5", "--n_samples", "2", "--n_iter", "1", *DEMO],
    "unclip-l": ["unclip-variate", "--init-img", "{shape_png}", "--ckpt", "{unclip_l}", "--config",
                 f"{TINY}/unclip-l-tiny.yaml", "--clip-stats", "{stats}", "--noise-level", "100", "--H", "32",
                 "--W", "32", "--steps", "4", "--n_samples", "2", "--n_iter", "1", *DEMO],
    "unclip-h-prompt": ["unclip-variate", "--init-img", "{shape_png}", "--ckpt", "{unclip_h}", "--config",
                        f"{TINY}/unclip-h-tiny.yaml", "--prompt", "watercolor", "--sampler", "dpmpp_2m", "--H",
                        "32", "--W", "32", "--steps", "4", "--n_samples", "1", "--n_iter", "1", *DEMO],
    "sdxl-base": ["txt2img", "a lighthouse", "--config", f"{TINY}/sdxl-base-tiny.yaml", "--ckpt", "{base}",
                  "--H", "32", "--W", "32", "--steps", "4", "--n_samples", "2", "--n_iter", "1",
                  "--original-size", "64,48", "--crop-coords", "2,4", *DEMO],
    "sdxl-base-legacy-grid": ["txt2img", "a lighthouse", "--config", f"{TINY}/sdxl-base-tiny.yaml", "--ckpt",
                              "{base}", "--H", "32", "--W", "32", "--steps", "4", "--grid", "sgm_legacy",
                              "--sampler", "dpmpp_2m", "--negative-prompt", "fog", "--n_samples", "1",
                              "--n_iter", "1", *DEMO],
    "sdxl-base-img2img": ["img2img", "a lighthouse", "--config", f"{TINY}/sdxl-base-tiny.yaml", "--ckpt", "{base}",
                          "--init-img", "{noise_png}", "--steps", "6", "--strength", "0.6", "--n_samples", "1", *DEMO],
    "sdxl-two-stage": ["sdxl-refine", "--prompt", "a lighthouse", "--ckpt", "{base}", "--refiner-ckpt", "{refiner}",
                       "--config", f"{TINY}/sdxl-base-tiny.yaml", "--refiner-config",
                       f"{TINY}/sdxl-refiner-tiny.yaml", "--H", "32", "--W", "32", "--steps", "6",
                       "--high-noise-frac", "0.5", "--n-samples", "2", *DEMO],
    "sdxl-refine-sdedit": ["sdxl-refine", "--init-img", "{noise_png}", "--prompt", "a lighthouse", "--refiner-ckpt",
                           "{refiner}", "--refiner-config", f"{TINY}/sdxl-refiner-tiny.yaml", "--steps", "6",
                           "--strength", "0.5", "--s-churn", "0.5", "--aesthetic-score", "7", *DEMO],
}


@lru_cache(maxsize=None)
def inputs(folder: str) -> dict[str, str]:
    """The files the cases read: tiny checkpoints (seeded random weights), init images, a prompt file."""
    import torch
    from safetensors.torch import save_file

    from ldm.checkpoint import build_model_on_meta, load_config
    from ldm.demo.shapes import ShapeSpec, render
    from tests.conftest import randomized_state_dict

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    out = {"tmp": str(root)}
    for name, config, seed in (("sd1", "sd1-tiny", 0), ("sd2v", "sd2v-tiny", 2), ("unclip_l", "unclip-l-tiny", 2),
                               ("unclip_h", "unclip-h-tiny", 2), ("base", "sdxl-base-tiny", 1),
                               ("refiner", "sdxl-refiner-tiny", 2)):
        path = root / f"{name}.safetensors"
        weights = randomized_state_dict(build_model_on_meta(load_config(TINY / f"{config}.yaml")), seed=seed)
        save_file(weights, str(path))
        out[name] = str(path)
    out["stats"] = str(root / "ViT-L-14_stats.th")
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(1, 16, generator=g) * 0.1, torch.rand(1, 16, generator=g) + 0.5), out["stats"])
    shape = render(ShapeSpec("circle", "red", "large", "white", 32.0, 30.0, 36.0), 64)
    Image.fromarray(np.asarray(shape)).save(root / "shape.png")
    out["shape_png"] = str(root / "shape.png")
    noise = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.png")
    out["noise_png"] = str(root / "noise.png")
    (root / "prompts.txt").write_text("a red circle\na blue square on a black background\na green triangle\n")
    out["prompts"] = str(root / "prompts.txt")
    return out


def run_case(name: str, folder: Path, extra: list[str] = ()) -> np.ndarray:
    """Run case ``name`` (files made under ``folder``; ``extra`` flags appended) and return its samples stacked
    top to bottom."""
    from typer.testing import CliRunner

    from ldm.cli.app import app

    values = inputs(str(folder / "inputs"))
    outdir = folder / (name + "".join(extra).replace("-", "_"))
    args = [a.format(**values) for a in CASES[name]] + list(extra) + ["--outdir", str(outdir)]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"{name}: exit {result.exit_code}: {result.stderr} {result.exception!r}")
    images = []
    for path in sorted((outdir / "samples").glob("*.png")):
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    if not images:
        raise RuntimeError(f"{name}: no samples written")
    width = max(i.shape[1] for i in images)
    return np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0))) for i in images])


def platform_key() -> dict[str, str | int]:
    """What floating-point results depend on beyond sdgen: the torch build, the CPU's vector units and the number
    of threads (oneDNN's convolutions sum in an order that follows it)."""
    import platform

    import torch

    from tests.tolerance import cpu_flags

    flags = cpu_flags(("avx", "amx", "fma", "sse4"))
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_flags": flags,
            "threads": torch.get_num_threads()}


def recorded(name: str) -> np.ndarray:
    with Image.open(RECORDED / f"{name}.png") as image:
        return np.asarray(image.convert("RGB"))


def record(names: list[str]) -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)  # as the test suite runs
    import json

    RECORDED.mkdir(parents=True, exist_ok=True)
    (RECORDED / "platform.json").write_text(json.dumps(platform_key(), indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            Image.fromarray(run_case(name, Path(tmp))).save(RECORDED / f"{name}.png")
            print("recorded", name)


if __name__ == "__main__":
    record(sys.argv[1:] or list(CASES))
