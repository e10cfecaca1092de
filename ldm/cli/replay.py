"""``sdgen replay MANIFEST``: run a recorded run again, to the same images.

The manifest (``OUTDIR/run-NNNN.json``) holds every option of the run, the prompts, the per-image seeds and
the sha256 of the checkpoint(s) and init image(s); the replay refuses files that changed. On the same device
(and the same torch build) the images are identical to the recorded ones, pixel for pixel. Every generation
command's manifest replays: each command module has ``options_from_manifest(data, outdir, device)`` ->
(options, expected hashes) and the function that runs those options (:data:`REPLAYABLE`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from ldm.cli.output import load_manifest
from ldm.cli.txt2img import report
from ldm.errors import SdgenError

#: command -> (module, function running its options with ``expect=``)
REPLAYABLE: dict[str, tuple[str, str]] = {
    "txt2img": ("ldm.cli.run", "execute"),
    "img2img": ("ldm.cli.run", "execute"),
    "safe-txt2img": ("ldm.cli.run", "execute"),
    "unclip-variate": ("ldm.cli.unclip_variate", "execute_unclip"),
    "sdxl-refine": ("ldm.cli.sdxl_refine", "execute_refine"),
}


def replay_manifest(data: Mapping[str, Any], outdir: Optional[str] = None, device: Optional[str] = None):
    """Run a loaded manifest's run again (the output folder / device overridden when given); returns its
    :class:`ldm.cli.run.RunResult`."""
    command = data.get("command")
    if command not in REPLAYABLE:
        raise SdgenError(f"cannot replay a {command!r} run (replayable: {', '.join(REPLAYABLE)})")
    module_name, function = REPLAYABLE[command]
    module = importlib.import_module(module_name)
    opts, expect = module.options_from_manifest(data, outdir, device)
    return getattr(module, function)(opts, expect=expect)


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
    report(replay_manifest(load_manifest(manifest), outdir, device))
