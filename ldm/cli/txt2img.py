"""``sdgen txt2img``: images from a text prompt (CompVis ``scripts/txt2img.py``, same flags and defaults).

With an SDXL config (``--config configs/sdxl/sd_xl_base.yaml``) the unset sampling flags take the SGM demo's
defaults and the SDXL micro-conditioning flags apply. With a Stable unCLIP-L checkpoint (``--ckpt
sd21-unclip-l.ckpt``) the prompt goes through Kakao Brain's Karlo prior to a CLIP image embedding, which conditions
the unCLIP decoder (SAI2 ``scripts/streamlit/stableunclip.py`` with "Use KARLO prior"), with that demo's defaults.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.defaults import describe
from ldm.models.prior.files import DEFAULT_PRIOR, PRIOR_CONFIG

COMMAND = "txt2img"

#: the flags of unCLIP-L text-to-image (the Karlo prior)
PRIOR_OWN = {
    "prior": (Annotated[Optional[str], typer.Option(
        "--prior", show_default=DEFAULT_PRIOR,
        help="unCLIP-L checkpoints: Karlo's prior (.ckpt or .safetensors) that turns the prompt into a CLIP image "
        "embedding")], None),
    "prior_config": (Annotated[Optional[str], typer.Option(
        "--prior-config", show_default=PRIOR_CONFIG, help="the prior's config (YAML)")], None),
    "prior_clip": (Annotated[Optional[str], typer.Option(
        "--prior-clip", show_default="the unCLIP checkpoint's own CLIP text tower",
        help="OpenAI CLIP ViT-L/14 weights for the prior's text tower, when the checkpoint lacks it (a state dict; "
        "TorchScript ViT-L-14.pt must be converted first)")], None),
    "prior_steps": (Annotated[Optional[int], typer.Option(
        "--prior-steps", show_default=describe(COMMAND, "prior_steps"),
        help="the prior's sampling steps (its 1000-step process respaced)")], None),
    "prior_scale": (Annotated[Optional[float], typer.Option(
        "--prior-scale", show_default=describe(COMMAND, "prior_scale"),
        help="the prior's classifier-free guidance scale (1.0: none)")], None),
    "noise_level": (Annotated[Optional[int], typer.Option(
        "--noise-level", "--noise_level", show_default=describe(COMMAND, "noise_level"),
        help="unCLIP-L: noise augmentation of the prior's image embedding, 0..999")], None),
    "clip_stats": (Annotated[Optional[str], typer.Option(
        "--clip-stats", "--clip_stats", show_default="ViT-L-14_stats.th beside the prior",
        help="unCLIP-L: Karlo's ViT-L-14_stats.th (CLIP-L embedding mean / std)")], None),
}

txt2img = o.command(
    COMMAND, o.COMMON_FLAGS
    + o.SDXL_FLAGS + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS,
    "Generate images from a text prompt (CompVis scripts/txt2img.py flags and defaults; SDXL configs too; "
    "unCLIP-L checkpoints through the Karlo prior).",
    own=PRIOR_OWN,
)
