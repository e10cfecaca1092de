"""The commands' progress display on stderr (a rich progress bar, off when stderr is no terminal) and the one
library call each generation command makes."""

from __future__ import annotations

from typing import Any, Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichProgress:
    """:class:`ldm.generation.run.Progress` as two bars: the run's images and the current batch's sampler steps."""

    def __init__(self) -> None:
        console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
        self.images_task = self.steps_task = None

    def __enter__(self) -> "RichProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, images: int, batches: int) -> None:
        self.images_task = self.bar.add_task("images", total=images)
        self.steps_task = self.bar.add_task("steps", total=None)

    def batch(self, jobs: list) -> None:
        self.bar.update(self.steps_task, completed=0)

    def step(self, done: int, total: int) -> None:
        self.bar.update(self.steps_task, completed=done, total=total)

    def image(self) -> None:
        self.bar.advance(self.images_task)


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
