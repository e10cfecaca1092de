"""``sdgen upscale``: 4x super-resolution guided by a prompt (SAI2 ``scripts/streamlit/superresolution.py``).

The low-res image, noise-augmented to ``--noise-level`` with its own schedule, conditions the x4 upscaler
(v-prediction, f = 4 VAE) through concatenated channels and a class label; DDIM samples from pure noise with the
streamlit demo's defaults (50 steps, scale 9, noise level 20). ``--tile`` runs large inputs in overlapping latent
tiles (blended at every step) with a tiled VAE decode, in bounded memory.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli.input_commands import input_command
from ldm.defaults import describe
from ldm.model_files import DEFAULT_UPSCALE_CKPT

upscale = input_command(
    "upscale",
    {"noise_level": (Annotated[Optional[int], typer.Option(
        "--noise-level", "--noise_level", show_default=describe("upscale", "noise_level"),
        help="noise added to the low-res input, 0..349 (the SAI2 README suggests about 100 for generated inputs)")],
        None),
     "tile": (Annotated[bool, typer.Option(
         "--tile", help="overlapping latent tiles blended at each step, and a tiled VAE decode: bounded memory for "
         "large inputs (differs slightly from a whole run)")], False)},
    DEFAULT_UPSCALE_CKPT, "x4-upscaler-ema.ckpt (or a .safetensors copy)",
    "Upscale an image 4x guided by a prompt (SAI2 superresolution scripts, x4-upscaler-ema.ckpt).",
)
