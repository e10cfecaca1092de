"""Generation from a model already in memory, in one call (the Python API; the commands use the run engine).

    from ldm.checkpoint import load_model
    from ldm.generation.api import generate_images

    model = load_model("configs/stable-diffusion/v1-inference.yaml", "sd-v1-4.ckpt")
    for image in generate_images(model, "a lighthouse", n=2, seed=7, steps=25):
        print(image.job.seed, image.pixels.shape)  # 7 (512, 512, 3), then 8 (512, 512, 3)

Image i of the call has seed ``seed + i`` and is identical to the same image of a ``sdgen txt2img`` run with the
same settings.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from ldm.generation.generate import GeneratedImage, StepCallback, generate
from ldm.generation.request import Settings, make_jobs
from ldm.generation.stages import build_stages


def vae_factor(model: Any) -> int:
    """The VAE downsampling factor of a loaded model (8 for the released models)."""
    return 2 ** (model.first_stage_model.encoder.num_resolutions - 1)


def default_grid(model: Any, sampler: str) -> str:
    """The sigma grid a model runs ``sampler`` on: SGM's "sgm" grid for SDXL, else the sampler's original grid."""
    from ldm.models.diffusion.engine import DiffusionEngine
    from ldm.sampling.grids import DEFAULT_GRID

    return "sgm" if isinstance(model, DiffusionEngine) else DEFAULT_GRID[sampler]


def generate_images(
    model: Any,
    prompt: str,
    *,
    n: int = 1,
    seed: int = 42,
    negative_prompt: str = "",
    sampler: str = "ddim",
    steps: int = 50,
    scale: float = 7.5,
    height: int = 512,
    width: int = 512,
    init_image: Optional[torch.Tensor] = None,
    strength: float = 0.75,
    on_step: Optional[StepCallback] = None,
    **settings: Any,
) -> Iterator[GeneratedImage]:
    """``n`` images of ``prompt`` in one batch, each yielded once decoded.

    ``init_image`` (3, H, W) in [-1, 1] makes it img2img with ``strength`` (the size is the image's);
    ``settings`` are further :class:`~ldm.generation.request.Settings` fields (``eta``, ``precision``, ``grid``,
    ``s_churn`` ...; precision defaults to "full").
    """
    if init_image is not None:
        height, width = int(init_image.shape[-2]), int(init_image.shape[-1])
    options = {"precision": "full", "grid": settings.pop("grid", None) or default_grid(model, sampler), **settings}
    values = Settings(sampler=sampler, steps=steps, scale=scale, height=height, width=width, factor=vae_factor(model),
                      strength=strength if init_image is not None else None, **options)
    batches = make_jobs([[prompt] * n], 1, seed, negative_prompt=negative_prompt,
                        init_images=[0 if init_image is not None else None])
    stages, start = build_stages([("model", model)], values)
    return generate(stages, batches, values, start_sigma=start,
                    init_images=[init_image] if init_image is not None else (), on_step=on_step)
