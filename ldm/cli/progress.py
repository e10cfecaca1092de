"""The commands' progress display on stderr and the one library call each generation command makes.

One rich progress bar for the whole run (images done of all, images per second, time left) and one for the
current batch's sampler steps, on process 0 only; off when stderr is no terminal.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class SpeedColumn(ProgressColumn):
    """Images per second of a task (rich's own speed estimate)."""

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.2f} img/s" if task.speed else "")


class RichProgress:
    """:class:`ldm.generation.run.Progress` as two bars: the run's images and the current batch's sampler steps."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                            disable=not console.is_terminal)
        self.images_task = self.steps_task = None

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, images: int, done: int) -> None:
        self.images_task = self.bar.add_task("images", total=images, completed=done)
        self.steps_task = self.bar.add_task("steps", total=None)

    def batch(self, jobs: list) -> None:
        self.bar.update(self.steps_task, completed=0)

    def step(self, done: int, total: int) -> None:
        self.bar.update(self.steps_task, completed=done, total=total)

    def images_done(self, done: int) -> None:
        self.bar.update(self.images_task, completed=done)


def run_command(opts: Any, notify: Optional[Callable[[str], None]] = None) -> None:
    """Run a generation command's options with a progress bar and print the originals' closing line."""
    from ldm.cli.options import report
    from ldm.generation.run import execute

    with RichProgress() as progress:
        result = execute(opts, progress=progress, **({"notify": notify} if notify else {}))
    report(result)


def replay_command(manifest: Any, outdir: Optional[str], device: Optional[str]) -> None:
    """Replay a run manifest with a progress bar and print the closing line."""
    from ldm.cli.options import report
    from ldm.generation.run import replay_manifest

    with RichProgress() as progress:
        result = replay_manifest(manifest, outdir, device, progress=progress)
    report(result)


def replay_png_command(path: Any, **given: Any) -> None:
    """Rerun one image from its PNG parameters, the ignored fields named in one warning line."""
    from ldm.generation.png_replay import options_from_png

    opts, ignored = options_from_png(path, **given)
    if ignored:
        typer.echo(f"sdgen: warning: ignoring fields sdgen does not act on: {', '.join(ignored)}", err=True)
    run_command(opts)
