"""``sdgen depth2img``: a new image with the depth of the input image (SAI2 ``scripts/gradio/depth2img.py``).

The depth comes from the MiDaS DPT-Hybrid network inside ``512-depth-ema.ckpt`` (or from ``--depth-map``), is
resized to the latent and scaled to [-1, 1] as the script does, and conditions the UNet as an extra input channel;
sampling is the script's DDIM img2img (``--strength`` 0.9, 50 steps, scale 9).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, optional_sld_flags, sld_options
from ldm.model_files import DEFAULT_DEPTH_CKPT

COMMAND = "depth2img"

OWN = {
    "depth_map": (Annotated[Optional[str], typer.Option(
        "--depth-map", "--depth_map", show_default="MiDaS DPT-Hybrid of the input image",
        help="a depth image (greyscale, 8 or 16 bit, larger = nearer, the size of --init-img) used instead of "
        "MiDaS's")], None),
    "ckpt": (Annotated[Optional[str], typer.Option(
        "--ckpt", show_default=DEFAULT_DEPTH_CKPT, help="512-depth-ema.ckpt (or a .safetensors copy)")], None),
    "config": (Annotated[Optional[str], typer.Option(
        "--config", show_default="picked from the checkpoint", help="model config (YAML)")], None),
}

_MODEL_AT = o.COMMON_FLAGS.index("config")
FLAGS = (o.COMMON_FLAGS[:2] + ("init_img", "depth_map", "strength") + o.COMMON_FLAGS[2:_MODEL_AT] + ("config", "ckpt")
         + o.COMMON_FLAGS[_MODEL_AT + 2:] + tuple(SLD_FLAGS) + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS)

depth2img = o.command(
    COMMAND, FLAGS,
    "Make an image with the depth of the input image, guided by a prompt (SAI2 depth2img scripts, MiDaS "
    "DPT-Hybrid).",
    own={**OWN, **optional_sld_flags()}, options=lambda given: sld_options(COMMAND, given, sld_always=False),
)
