"""``sdgen replay MANIFEST``: run a recorded txt2img / img2img run again, to the same images.

The manifest (``OUTDIR/run-NNNN.json``) holds every option of the run, the prompts, the per-image seeds and
the sha256 of the checkpoint and init image; the replay refuses files that changed. On the same device (and
the same torch build) the images are identical to the recorded ones, pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.options import GenerateOptions
from ldm.cli.output import load_manifest
from ldm.cli.txt2img import report
from ldm.errors import SdgenError

REPLAYABLE = ("txt2img", "img2img", "safe-txt2img")


def replay_options(data: dict, outdir: Optional[str], device: Optional[str]) -> GenerateOptions:
    """The options of a recorded run, with the output folder / device overridden when given."""
    if data.get("command") not in REPLAYABLE:
        raise SdgenError(f"cannot replay a {data.get('command')!r} run (replayable: {', '.join(REPLAYABLE)})")
    opts = GenerateOptions.from_dict(data["options"])
    if data.get("per_image_prompts"):
        opts.prompt_list = list(data["prompts"])
    opts.outdir = outdir or opts.outdir
    opts.device = device or data.get("device", opts.device)
    return opts


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
    from ldm.cli.run import execute

    data = load_manifest(manifest)
    opts = replay_options(data, outdir, device)
    model = data.get("model", {})
    init = data.get("init_image") or {}
    expect = {"checkpoint_sha256": model.get("checkpoint_sha256"), "init_image_sha256": init.get("sha256")}
    report(execute(opts, expect=expect))
