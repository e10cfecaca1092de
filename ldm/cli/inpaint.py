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

from ldm.cli.input_commands import input_command
from ldm.model_files import DEFAULT_INPAINT_CKPT

inpaint = input_command(
    "inpaint",
    {"mask": (Annotated[Optional[str], typer.Option(
        "--mask", show_default="required",
        help="the mask image, the size of --init-img: white (>= 128 of 255 in greyscale) is repainted, black kept")],
        None)},
    f"{DEFAULT_INPAINT_CKPT}, else the demo model",
    "an inpainting checkpoint (512-inpainting-ema.ckpt, a 9-channel SD 1.5 one) or any SD 1.x / 2.x one (.ckpt or "
    ".safetensors)",
    "Repaint the masked region of an image guided by a prompt (SAI2 inpainting scripts; inpainting or ordinary "
    "checkpoints).",
)
