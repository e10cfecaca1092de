"""``sdgen replay MANIFEST | IMAGE.png``: run a recorded run, or one image, again.

A run manifest (``OUTDIR/run-NNNN.json``) holds every option of the run, the prompts, the per-image seeds and
the sha256 of every file; the replay refuses files that changed, and on the same device (and torch build) the
images are identical to the recorded ones. A PNG written by sdgen or by AUTOMATIC1111 is rerun from its
parameters (:mod:`ldm.generation.png_replay`): its checkpoint is found by its Model hash among ``--ckpt``,
``--models-dir``, the default checkpoint paths and the bundled demo model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def replay(
    recorded: Annotated[Path, typer.Argument(metavar="MANIFEST_OR_PNG",
                                             help="a run manifest (OUTDIR/run-NNNN.json) or an image (.png)")],
    outdir: Annotated[
        Optional[str], typer.Option("--outdir", show_default="the recorded one (numbering continues)",
                                    help="write the replayed images here")] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", show_default="the recorded one",
                                    help="run on this device (identical images need the recorded device)")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", show_default=False,
                                                help="PNG: the checkpoint, if its hash is the image's")] = None,
    models_dir: Annotated[Optional[str], typer.Option(
        "--models-dir", show_default=False,
        help="PNG: a folder of checkpoints (found by the image's Model hash), LoRAs and embeddings")] = None,
    init_img: Annotated[Optional[str], typer.Option("--init-img", show_default=False,
                                                    help="PNG made by img2img, inpaint, depth2img or upscale: "
                                                    "its input image")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", show_default=False,
                                                help="PNG made by inpaint: its mask")] = None,
    depth_map: Annotated[Optional[str], typer.Option("--depth-map", show_default=False,
                                                     help="PNG made by depth2img --depth-map: its depth map")] = None,
) -> None:
    """Re-run a recorded run from its manifest, or one image from its PNG parameters."""
    from ldm.cli.progress import replay_command, replay_png_command

    if recorded.suffix.lower() == ".png":
        replay_png_command(recorded, outdir=outdir, device=device, ckpt=ckpt, models_dir=models_dir,
                           init_img=init_img, mask=mask, depth_map=depth_map)
    else:
        replay_command(recorded, outdir, device)
