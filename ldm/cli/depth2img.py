"""``sdgen depth2img``: a new image with the depth of the input image (SAI2 ``scripts/gradio/depth2img.py``).

The depth comes from the MiDaS DPT-Hybrid network inside ``512-depth-ema.ckpt`` (or from ``--depth-map``), is
resized to the latent and scaled to [-1, 1] as the script does, and conditions the UNet as an extra input channel;
sampling is the script's DDIM img2img (``--strength`` 0.9, 50 steps, scale 9).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.cli.input_commands import input_command
from ldm.model_files import DEFAULT_DEPTH_CKPT

depth2img = input_command(
    "depth2img",
    {"depth_map": (Annotated[Optional[str], typer.Option(
        "--depth-map", "--depth_map", show_default="MiDaS DPT-Hybrid of the input image",
        help="a depth image (greyscale, 8 or 16 bit, larger = nearer, the size of --init-img) used instead of "
        "MiDaS's")], None),
     "strength": (o.flags("depth2img").strength, None)},  # the shared flag, shown after --depth-map
    DEFAULT_DEPTH_CKPT, "512-depth-ema.ckpt (or a .safetensors copy)",
    "Make an image with the depth of the input image, guided by a prompt (SAI2 depth2img scripts, MiDaS "
    "DPT-Hybrid).",
)
