"""``sdgen inpaint``: repaint the masked region of an image (SAI2 ``scripts/streamlit/inpainting.py``).

With an inpainting checkpoint (``512-inpainting-ema.ckpt``, or an SD 1.5-style 9-channel one) the mask and the
masked image's latent are extra UNet inputs, and DDIM samples from pure noise with the streamlit demo's defaults
(50 steps, scale 10, eta 0). With an ordinary SD 1.x / 2.x checkpoint the known region is blended in at each step
(the original DDIM sampler's ``mask`` / ``x0`` route); the run header says which of the two it is. The mask is read
as greyscale: >= 0.5 (8-bit 128 and above, white) is repainted, the rest is kept.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, optional_sld_flags, sld_options
from ldm.model_files import DEFAULT_INPAINT_CKPT

COMMAND = "inpaint"

OWN = {
    "mask": (Annotated[Optional[str], typer.Option(
        "--mask", show_default="required",
        help="the mask image, the size of --init-img: white (>= 128 of 255 in greyscale) is repainted, black kept")],
        None),
    "ckpt": (Annotated[Optional[str], typer.Option(
        "--ckpt", show_default=f"{DEFAULT_INPAINT_CKPT}, else the demo model",
        help="an inpainting checkpoint (512-inpainting-ema.ckpt, a 9-channel SD 1.5 one) or any SD 1.x / 2.x one "
        "(.ckpt or .safetensors)")], None),
    "config": (Annotated[Optional[str], typer.Option(
        "--config", show_default="picked from the checkpoint", help="model config (YAML)")], None),
}

_MODEL_AT = o.COMMON_FLAGS.index("config")
FLAGS = (o.COMMON_FLAGS[:2] + ("init_img", "mask") + o.COMMON_FLAGS[2:_MODEL_AT] + ("config", "ckpt")
         + o.COMMON_FLAGS[_MODEL_AT + 2:] + tuple(SLD_FLAGS) + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS)

inpaint = o.command(
    COMMAND, FLAGS,
    "Repaint the masked region of an image guided by a prompt (SAI2 inpainting scripts; inpainting or ordinary "
    "checkpoints).",
    own={**OWN, **optional_sld_flags()}, options=lambda given: sld_options(COMMAND, given, sld_always=False),
)
