"""``sdgen unclip-variate``: image variations with Stable unCLIP (SD 2.1 unCLIP-L / -H).

The init image's CLIP embedding, noise-augmented to ``--noise-level``, conditions the UNet through its ADM input;
an optional ``--prompt`` mixes in text. Guidance runs jointly on text and image: the unconditional branch has
the negative prompt and an all-zero ADM vector (SAI2 ``scripts/streamlit/stableunclip.py``). Defaults are the
streamlit demo's: 20 DDIM steps (eta 0), scale 10.0, noise level 0, 768 x 768, 2 samples x 2 runs, seed 42.
``--init-img`` takes one image or a folder of images (each gets its own variations). Any SLD flag
(``--sld PRESET`` ...) adds Safe Latent Diffusion guidance, as in ``safe-txt2img``.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, optional_sld_flags, sld_options
from ldm.defaults import describe
from ldm.model_files import DEFAULT_UNCLIP_CKPT

COMMAND = "unclip-variate"

OWN = {
    "init_img": (Annotated[Optional[str], typer.Option(
        "--init-img", "--init_img", show_default="required",
        help="the input image, or a folder of images (each gets its own variations)")], None),
    "noise_level": (Annotated[Optional[int], typer.Option(
        "--noise-level", "--noise_level", show_default=describe(COMMAND, "noise_level"),
        help="noise augmentation of the image embedding, 0..999 (0: closest to the input image; higher: more "
        "varied)")], None),
    "ckpt": (Annotated[Optional[str], typer.Option(
        "--ckpt", show_default=DEFAULT_UNCLIP_CKPT,
        help="sd21-unclip-l.ckpt or sd21-unclip-h.ckpt (or .safetensors copies)")], None),
    "config": (Annotated[Optional[str], typer.Option(
        "--config", show_default="picked from the checkpoint (unCLIP-L or -H)", help="model config (YAML)")], None),
    "clip_stats": (Annotated[Optional[str], typer.Option(
        "--clip-stats", "--clip_stats", show_default=False,
        help="Karlo's ViT-L-14_stats.th (CLIP-L embedding mean/std) for unCLIP-L")], None),
    "embedder_ckpt": (Annotated[Optional[str], typer.Option(
        "--embedder-ckpt", "--embedder_ckpt", show_default=False,
        help="CLIP weights of the image embedder, for a checkpoint saved without them")], None),
}


def action(opts: Any) -> None:
    """Run the options, the unCLIP-L statistics notice shown as one warning line."""
    from ldm.cli.progress import run_command

    run_command(opts, notify=lambda message: typer.echo(f"sdgen: warning: {message}", err=True))


_MODEL_AT = o.COMMON_FLAGS.index("config")
FLAGS = (o.COMMON_FLAGS[:2] + ("init_img", "noise_level") + o.COMMON_FLAGS[2:_MODEL_AT]
         + ("config", "ckpt", "clip_stats", "embedder_ckpt") + o.COMMON_FLAGS[_MODEL_AT + 2:] + tuple(SLD_FLAGS)
         + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS)

unclip_variate = o.command(
    COMMAND, FLAGS,
    "Make variations of an image (or of each image in a folder) with Stable unCLIP (SD 2.1 unCLIP-L / -H).",
    own={**OWN, **optional_sld_flags()}, action=action, options=lambda given: sld_options(COMMAND, given, sld_always=False),
)
