"""Writing a run's images as they come, from any number of processes, so that a run killed at any moment can be
resumed.

* Image k of a run is ``samples/{first_sample + k:05}.png``, written whole or not at all (beside, then renamed),
  with its A1111 parameters and its job record (an ``sdgen-job`` chunk: prompts, seed, settings, file hashes).
* Each process appends one JSON line per written image to ``run-NNNN.part-RRR.jsonl`` (flushed to disk at once).
* Process 0 keeps ``run-NNNN.json`` (replaced atomically) listing the images of every process, merges the part
  files when the run ends (and deletes them) and writes the grid.
* ``--resume`` (:func:`finished_jobs`) finds the images already made by their files and job records; a record that
  differs from what the command now asks for is refused, naming the first difference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ldm.errors import SdgenError
from ldm.output import ImageRecord, OutputFolder, RunManifest, RunResult, format_parameters, read_job, relative_to

logger = logging.getLogger(__name__)

#: How often process 0 rewrites the manifest while a run goes on (it is always written when the run ends).
MANIFEST_INTERVAL_S = 1.0


class RunInterrupted(SdgenError):
    """Ctrl-C during a run, after the finished images were kept (exit code 130)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


def _first_difference(recorded: Mapping[str, Any], planned: Mapping[str, Any], prefix: str = "") -> Optional[str]:
    for key in planned:
        a, b = recorded.get(key), planned.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} {a!r} (now {b!r})"
    return None


def finished_jobs(out: OutputFolder, keys: Mapping[int, Mapping[str, Any]]) -> set[int]:
    """The indices of the planned jobs (``index -> job record``) whose image is already in the run's folder.

    Raises:
        SdgenError: an image was made with other settings than the job now asks for (the first difference named).
    """
    done = set()
    for index, key in keys.items():
        path = out.sample_path(index)
        if not path.exists():
            continue
        recorded = read_job(path)
        if recorded is None:
            logger.warning("%s is damaged or has no job record; it is made again", path)
            continue
        difference = _first_difference(recorded, key)
        if difference:
            raise SdgenError(f"--resume: {relative_to(path, out.root)} was made with {difference}; resume with the "
                             "original command, or start a new run without --resume")
        done.add(index)
    return done


def read_parts(out: OutputFolder) -> list[dict[str, Any]]:
    """The image records in the run's part files (a line cut by a crash is skipped)."""
    records = []
    for path in sorted(out.root.glob(f"run-{out.run_number:04}.part-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class RunWriter:
    """The writing side of one process of a run (module docstring).

    Args:
        out: the run's folder (pointed at the run: :meth:`OutputFolder.continue_run` for a resumed one).
        rank, main: this process and whether it keeps the manifest.
        header: the manifest's description of the run (process 0).
        safety: :class:`ldm.safety.postprocess.OutputSafety` (verdicts in the PNG parameters, watermark).
        settings_line: a job's PNG parameters line (``Key: value`` pairs); "Seed", "Batch size" and "Batch pos"
            are filled in per image, ``per_image(job)`` adds the image's own entries.
        previous: the records of images a resumed run already has.
    """

    def __init__(self, out: OutputFolder, *, rank: int, main: bool, header: Mapping[str, Any], safety: Any,
                 settings_line: Callable[[Any], Mapping[str, Any]], batch_sizes: Mapping[int, int],
                 skip_save: bool = False, job_record: Optional[Callable[[Any], Mapping[str, Any]]] = None,
                 per_image: Optional[Callable[[Any], Mapping[str, Any]]] = None,
                 tags_of: Optional[Callable[[Any], Optional[dict]]] = None,
                 previous: Sequence[Mapping[str, Any]] = ()) -> None:
        self.out, self.safety, self.settings_line = out, safety, settings_line
        self.batch_sizes, self.skip_save = dict(batch_sizes), skip_save
        self.job_record, self.per_image, self.tags_of = job_record, per_image, tags_of
        self.previous = [dict(r) for r in previous]
        self.main = main
        self.written = 0
        self.pixels: dict[int, np.ndarray] = {}  # unmarked, for the grid
        self.first_parameters: dict[int, str] = {}
        self._part_path = out.part_path(rank)
        self._part = open(self._part_path, "a", encoding="utf-8")
        self._last_manifest = 0.0
        self.manifest = RunManifest(out.manifest_path, {**header, "safety": safety.manifest()},
                                    self.previous) if main else None

    def write(self, image: Any) -> None:
        """Save one :class:`ldm.generation.generate.GeneratedImage` and record it."""
        job = image.job
        parameters = format_parameters(job.prompt, job.negative_prompt, {
            **self.settings_line(job), "Seed": job.seed, "Batch size": self.batch_sizes[job.batch],
            "Batch pos": job.position, **(self.per_image(job) if self.per_image else {}),
            **self.safety.png_settings(image.flagged),
        })
        self.first_parameters.setdefault(job.index, parameters)
        file, digest = None, None
        if not self.skip_save:
            record = self.job_record(job) if self.job_record else None
            path, digest = self.out.save_sample(self.safety.mark(image.pixels), job.index, parameters, record)
            file = relative_to(path, self.out.root)
        if image.flagged:
            logger.warning("the safety checker flagged image %d (seed %d)%s; it is saved black",
                           job.index, job.seed, f" ({file})" if file else "")
        self.pixels[job.index] = image.pixels
        tags = self.tags_of(job) if self.tags_of else None
        line = json.dumps(ImageRecord(job.index, job.seed, job.prompt, file, digest, tags).as_dict(), ensure_ascii=False)
        self._part.write(line + "\n")
        self._part.flush()
        os.fsync(self._part.fileno())
        self.written += 1
        if self.main and time.monotonic() - self._last_manifest >= MANIFEST_INTERVAL_S:
            self._update_manifest()

    def _update_manifest(self) -> None:
        self.manifest.set_images(self.previous + read_parts(self.out))
        self._last_manifest = time.monotonic()

    def close(self) -> None:
        if not self._part.closed:
            self._part.close()

    def interrupted(self, total: int) -> RunInterrupted:
        """Record the images so far and mark the run "interrupted"; returns the error to raise."""
        self.close()
        if self.main:
            self._finish("interrupted")
            kept = len(self.manifest.data["images"])
        else:
            kept = self.written
        return RunInterrupted(f"interrupted: kept {kept} of {total} images in {self.out.root} "
                              f"(manifest {self.out.manifest_path.name})")

    def failed(self) -> None:
        self.close()
        if self.main:
            self._finish("failed")

    def _finish(self, status: str, grid: Optional[Path] = None) -> None:
        self._update_manifest()
        self.manifest.finish(status, grid)
        for path in self.out.root.glob(f"run-{self.out.run_number:04}.part-*.jsonl"):
            path.unlink(missing_ok=True)

    def complete(self, grid: Optional[np.ndarray], grid_parameters: Optional[str]) -> RunResult:
        """Process 0, once every process is done: the grid (watermarked) and the manifest marked "complete"."""
        self.close()
        path = None
        if grid is not None:
            path = self.out.save_grid(grid, grid_parameters, postprocess=self.safety.mark)
        self._finish("complete", path)
        samples = [self.out.root / r["file"] for r in self.manifest.data["images"] if r.get("file")]
        return RunResult(outdir=self.out.root, samples=samples, grid=path, manifest=self.out.manifest_path)
