"""The shape the commands of an input image share (``inpaint``, ``depth2img``, ``upscale``): the shared flags with
``--init-img`` and the command's own inputs after the prompt, ``--config`` picked from the checkpoint, a ``--ckpt``
with the command's default path, optional SLD, and the text, speed and run flags."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Mapping, Optional

import typer

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, optional_sld_flags, sld_options

_MODEL_AT = o.COMMON_FLAGS.index("config")


def input_command(name: str, inputs: Mapping[str, tuple[Any, Any]], ckpt_default: str, ckpt_help: str,
                  doc: str) -> Callable[..., None]:
    """The Typer command ``name``: its own ``inputs`` flags (``{name: (Annotated type, default)}``, shown after
    ``--init-img``), ``--config`` / ``--ckpt`` (``ckpt_default`` as --help shows it) and everything else shared."""
    own = {
        **inputs,
        "ckpt": (Annotated[Optional[str], typer.Option("--ckpt", show_default=ckpt_default, help=ckpt_help)], None),
        "config": (Annotated[Optional[str], typer.Option(
            "--config", show_default="picked from the checkpoint", help="model config (YAML)")], None),
    }
    flags = (o.COMMON_FLAGS[:2] + ("init_img", *inputs) + o.COMMON_FLAGS[2:_MODEL_AT] + ("config", "ckpt")
             + o.COMMON_FLAGS[_MODEL_AT + 2:] + tuple(SLD_FLAGS) + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS)
    return o.command(name, flags, doc, own={**own, **optional_sld_flags()},
                     options=lambda given: sld_options(name, given, sld_always=False))


__all__ = ["input_command"]
