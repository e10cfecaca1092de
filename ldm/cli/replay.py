"""``sdgen replay MANIFEST``: run a recorded run again, to the same images.

The manifest (``OUTDIR/run-NNNN.json``) holds every option of the run, the prompts, the per-image seeds and
the sha256 of the checkpoint(s) and init image(s); the replay refuses files that changed. On the same device
(and the same torch build) the images are identical to the recorded ones, pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def replay(
    manifest: Annotated[Path, typer.Argument(help="a run manifest (OUTDIR/run-NNNN.json)")],
    outdir: Annotated[
        Optional[str], typer.Option("--outdir", show_default="the recorded one (numbering continues)",
                                    help="write the replayed images here")] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", show_default="the recorded one",
                                    help="run on this device (identical images need the recorded device)")] = None,
) -> None:
    """Re-run a recorded run from its manifest, to identical images on the same device."""
    from ldm.cli.progress import replay_command

    replay_command(manifest, outdir, device)
