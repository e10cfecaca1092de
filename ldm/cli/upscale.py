"""``sdgen upscale``: 4x super-resolution guided by a prompt (SAI2 ``scripts/streamlit/superresolution.py``).

The low-res image, noise-augmented to ``--noise-level`` with its own schedule, conditions the x4 upscaler
(v-prediction, f = 4 VAE) through concatenated channels and a class label; DDIM samples from pure noise with the
streamlit demo's defaults (50 steps, scale 9, noise level 20). ``--tile`` runs large inputs in overlapping latent
tiles (blended at every step) with a tiled VAE decode, in bounded memory.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, optional_sld_flags, sld_options
from ldm.defaults import describe
from ldm.model_files import DEFAULT_UPSCALE_CKPT

COMMAND = "upscale"

OWN = {
    "noise_level": (Annotated[Optional[int], typer.Option(
        "--noise-level", "--noise_level", show_default=describe(COMMAND, "noise_level"),
        help="noise added to the low-res input, 0..349 (the SAI2 README suggests about 100 for generated inputs)")],
        None),
    "tile": (Annotated[bool, typer.Option(
        "--tile", help="overlapping latent tiles blended at each step, and a tiled VAE decode: bounded memory for "
        "large inputs (differs slightly from a whole run)")], False),
    "ckpt": (Annotated[Optional[str], typer.Option(
        "--ckpt", show_default=DEFAULT_UPSCALE_CKPT, help="x4-upscaler-ema.ckpt (or a .safetensors copy)")], None),
    "config": (Annotated[Optional[str], typer.Option(
        "--config", show_default="picked from the checkpoint", help="model config (YAML)")], None),
}

_MODEL_AT = o.COMMON_FLAGS.index("config")
FLAGS = (o.COMMON_FLAGS[:2] + ("init_img", "noise_level", "tile") + o.COMMON_FLAGS[2:_MODEL_AT] + ("config", "ckpt")
         + o.COMMON_FLAGS[_MODEL_AT + 2:] + tuple(SLD_FLAGS) + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS)

upscale = o.command(
    COMMAND, FLAGS,
    "Upscale an image 4x guided by a prompt (SAI2 superresolution scripts, x4-upscaler-ema.ckpt).",
    own={**OWN, **optional_sld_flags()}, options=lambda given: sld_options(COMMAND, given, sld_always=False),
)
