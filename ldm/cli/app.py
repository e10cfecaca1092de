"""The ``sdgen`` command: a Typer app that registers one module per command group.

A user-facing problem (:class:`~ldm.errors.SdgenError`) ends a command with ONE line on stderr and the
error's exit code (2; 130 for an interrupted run), never a traceback; anything else is a bug and keeps its
traceback. To add a command, add one ``(name, "module:function")`` line to :data:`COMMANDS`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import typer

from ldm import __version__
from ldm.errors import SdgenError

COMMANDS: tuple[tuple[str, str], ...] = (
    ("txt2img", "ldm.cli.txt2img:txt2img"),
    ("img2img", "ldm.cli.img2img:img2img"),
    ("safe-txt2img", "ldm.cli.safe_txt2img:safe_txt2img"),
    ("replay", "ldm.cli.replay:replay"),
    ("inspect", "ldm.cli.inspect:inspect"),
    ("unclip-variate", "ldm.cli.unclip_variate:unclip_variate"),
    ("sdxl-refine", "ldm.cli.sdxl_refine:sdxl_refine"),
    ("inpaint", "ldm.cli.inpaint:inpaint"),
    ("depth2img", "ldm.cli.depth2img:depth2img"),
    ("upscale", "ldm.cli.upscale:upscale"),
    ("train", "ldm.cli.train:train"),
)

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C

app = typer.Typer(
    name="sdgen",
    help="Stable Diffusion inference from the released checkpoints (SD 1.x, SD 2.x / unCLIP, SDXL, SLD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def one_line(message: str) -> str:
    """Collapse a message to a single line (the CLI's error contract)."""
    return " ".join(str(message).split())


def process_rank() -> int:
    """This process's rank in a run of several (Lightning Fabric, torchrun and SLURM set RANK / LOCAL_RANK): 0
    alone. Only process 0 speaks to the user; the others exit with the same code."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so user errors and Ctrl-C become one stderr line (from process 0) and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SdgenError as exc:
            if process_rank() == 0:
                typer.echo(f"sdgen: error: {one_line(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if process_rank() == 0:
                typer.echo("sdgen: interrupted", err=True)
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None

    return wrapper


def register(target: typer.Typer, name: str, spec: str) -> None:
    """Import ``module:function`` and add it to ``target`` as command ``name`` (with error handling)."""
    module_name, _, func_name = spec.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    target.command(name)(guarded(func))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log progress details (INFO) to stderr"),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Stable Diffusion inference from the released checkpoints."""
    rank = process_rank()
    # processes other than 0 of a run of several stay quiet unless --verbose, which logs every process
    level = logging.INFO if verbose else (logging.WARNING if rank == 0 else logging.ERROR)
    prefix = f"[process {rank}] " if rank or verbose and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level, format=f"%(levelname)s {prefix}%(name)s: %(message)s")


for _name, _spec in COMMANDS:
    register(app, _name, _spec)


def _add_eval() -> None:
    """``sdgen eval ...``: the evaluation commands, a group of their own."""
    from ldm.cli import eval as eval_commands

    eval_commands._register()
    app.add_typer(eval_commands.eval_app, name="eval")


_add_eval()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``sdgen = ldm.cli.app:main``); ``argv`` defaults to ``sys.argv[1:]``."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="sdgen")
    except SdgenError as exc:  # raised outside a command (e.g. while parsing)
        typer.echo(f"sdgen: error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
