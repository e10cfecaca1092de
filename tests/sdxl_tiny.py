"""Tiny SDXL base / refiner models with seeded random weights (configs/tests/sdxl-*-tiny.yaml).

Same layout as the released models at toy widths: two text encoders (base) or one (refiner), the size/crop/
aesthetic Fourier embedders, a 2-level UNet with ADM input, a VAE downsampling by 2 (32 px images -> 16 x 16
latents). Weights come from ``tests.conftest.randomized_state_dict`` (N(0, 0.1^2), norm scales around 1).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.models.diffusion.engine import DiffusionEngine
from tests.conftest import randomized_state_dict

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIGS = {
    "base": REPO / "configs" / "tests" / "sdxl-base-tiny.yaml",
    "refiner": REPO / "configs" / "tests" / "sdxl-refiner-tiny.yaml",
}
SEEDS = {"base": 1, "refiner": 2}
SIZE = 32  # pixels; the latent is 16 x 16


@lru_cache(maxsize=None)
def tiny_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """The tiny model's full state_dict with seeded random weights (cached; copy before consuming)."""
    return randomized_state_dict(build_model_on_meta(load_config(TINY_CONFIGS[kind])), seed=SEEDS[kind])


def tiny_engine(kind: str) -> DiffusionEngine:
    """A fresh tiny engine (``kind`` "base" or "refiner") loaded with :func:`tiny_state_dict`."""
    model = build_model_on_meta(load_config(TINY_CONFIGS[kind]))
    return assign_state_dict(model, dict(tiny_state_dict(kind)), source=f"tiny {kind}")


def write_tiny_checkpoint(kind: str, path: Path) -> Path:
    """Save the tiny model's weights as a .safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_state_dict(kind).items()}, str(path))
    return path
