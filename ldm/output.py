"""What a run leaves on disk: sample PNGs with their parameters, the grid, and the run manifest (:class:`RunWriter`).

Layout, as the CompVis scripts write it (CV ``scripts/txt2img.py``)::

    OUTDIR/samples/00000.png, 00001.png, ...   one file per image, numbering continues across runs
    OUTDIR/grid-0000.png                       all images of a run, ``n_rows`` images per row
    OUTDIR/run-0000.json                       the run manifest (sdgen), same number as the grid

Every PNG carries its generation parameters in a ``parameters`` text chunk, in the format AUTOMATIC1111's
web UI writes and image viewers read (prompt lines, ``Negative prompt: ...``, then ``Key: value, ...``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
MANIFEST_FORMAT = "sdgen-run"
MANIFEST_VERSION = 1
GRID_PADDING = 2  # torchvision.utils.make_grid's default, used by the CompVis scripts

_NEEDS_QUOTES = re.compile(r'[,:\n"]')


# ----------------------------------------------------------------------------- PNG parameters


def _quote(value: Any) -> str:
    """A1111 quotes a value that contains a separator (JSON string syntax)."""
    text = str(value)
    return json.dumps(text) if _NEEDS_QUOTES.search(text) else text


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, Any]) -> str:
    """The ``parameters`` text of one image.

    Line(s) 1..n: the prompt; then ``Negative prompt: ...`` (left out when empty); then one line of
    ``Key: value`` pairs joined by ``", "`` in the order of ``settings`` (None values are left out).
    """
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items() if value is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w][\w \-/()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """Inverse of :func:`format_parameters`: ``{"prompt", "negative_prompt", <key>: <str value>, ...}``."""
    lines = text.split("\n")
    settings_line = lines[-1] if len(lines) > 1 else ""
    body = lines[:-1] if len(lines) > 1 else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in body:
        if line.startswith("Negative prompt: ") and not negative_lines:
            negative_lines.append(line[len("Negative prompt: "):])
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    result: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for match in _PAIR.finditer(settings_line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            value = json.loads(value)
        result[key] = value
    return result


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """Parse the ``parameters`` chunk of a PNG written by sdgen (or any A1111-compatible tool)."""
    with Image.open(path) as image:
        text = image.text.get(PARAMETERS_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise SdgenError(f"{path}: the PNG has no '{PARAMETERS_KEY}' text chunk")
    return parse_parameters(text)


def save_png(image: np.ndarray, path: Path, parameters: str | None) -> str:
    """Write an (H, W, 3) uint8 array as PNG, with the parameters chunk when given; returns the file's sha256."""
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def make_grid(images: Sequence[np.ndarray], n_rows: int, padding: int = GRID_PADDING) -> np.ndarray:
    """Tile (H, W, 3) uint8 images, ``n_rows`` images per row, with black padding.

    Same geometry as ``torchvision.utils.make_grid(nrow=n_rows)`` that the CompVis scripts use (its
    ``nrow`` is the number of images per row, despite the name); like it, a single image is returned as is.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if len(images) == 1:
        return images[0].copy()
    h, w, c = images[0].shape
    cols = min(max(n_rows, 1), len(images))
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for k, image in enumerate(images):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[top:top + h, left:left + w] = image
    return grid


# ----------------------------------------------------------------------------- output folder


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_NUMBERED = re.compile(r"^(\d+)\.png$")
_RUN_FILE = re.compile(r"^(?:grid|run)-(\d+)\.(?:png|json)$")


class OutputFolder:
    """An output folder in the CompVis layout; created and checked for writability on construction.

    Sample numbers continue after the highest existing ``samples/NNNNN.png``; the grid and the manifest of a
    run share the next free run number.
    """

    def __init__(self, outdir: str | os.PathLike) -> None:
        self.root = Path(outdir)
        self.samples = self.root / "samples"
        try:
            self.samples.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".sdgen-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise SdgenError(f"cannot write to the output folder {self.root}: {reason}") from exc
        self.next_sample = 1 + max(
            (int(m.group(1)) for p in self.samples.iterdir() if (m := _NUMBERED.match(p.name))), default=-1
        )
        self.run_number = 1 + max(
            (int(m.group(1)) for p in self.root.iterdir() if (m := _RUN_FILE.match(p.name))), default=-1
        )

    @property
    def manifest_path(self) -> Path:
        return self.root / f"run-{self.run_number:04}.json"

    @property
    def grid_path(self) -> Path:
        return self.root / f"grid-{self.run_number:04}.png"

    def save_sample(self, image: np.ndarray, parameters: str | None) -> tuple[Path, str]:
        """Write the next ``samples/NNNNN.png``; returns (path, sha256 of the file)."""
        path = self.samples / f"{self.next_sample:05}.png"
        digest = self._save(image, path, parameters)
        self.next_sample += 1
        return path, digest

    def save_grid(
        self,
        images: Sequence[np.ndarray],
        n_rows: int,
        parameters: str | None,
        postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> Path:
        """Write ``grid-NNNN.png`` of this run (``postprocess``, e.g. the watermark, applied to the whole grid)
        and return its path."""
        path = self.grid_path
        grid = make_grid(images, n_rows)
        self._save(postprocess(grid) if postprocess is not None else grid, path, parameters)
        return path

    @staticmethod
    def _save(image: np.ndarray, path: Path, parameters: str | None) -> str:
        try:
            return save_png(image, path, parameters)
        except OSError as exc:
            raise SdgenError(f"cannot write {path}: {exc.strerror or exc}") from exc


# ----------------------------------------------------------------------------- run manifest


@dataclass
class ImageRecord:
    """One written image of a run, as the manifest lists it."""

    index: int
    seed: int
    prompt: str
    file: str | None  # relative to the output folder; None with --skip_save
    sha256: str | None


class RunManifest:
    """The JSON record of a run, rewritten (atomically) after every image so an interrupted run keeps it.

    ``data`` holds: format, format_version, command, status (running | complete | interrupted | failed),
    created / finished (UTC ISO times), versions, options (every flag), model (config + checkpoint paths and
    hashes), seeds (planned, per image), prompts, images (written so far), grid.
    """

    def __init__(self, path: Path, header: Mapping[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            **header,
            "status": "running",
            "created": _now(),
            "finished": None,
            "images": [],
            "grid": None,
        }
        self.write()

    def write(self) -> None:
        try:
            text = json.dumps(self.data, indent=2, ensure_ascii=False, allow_nan=False)  # strict JSON for any reader
            _atomic_write_text(self.path, text + "\n")
        except OSError as exc:
            raise SdgenError(f"cannot write the run manifest {self.path}: {exc.strerror or exc}") from exc

    def add_image(self, record: ImageRecord) -> None:
        self.data["images"].append(vars(record).copy())
        self.write()

    def finish(self, status: str, grid: Path | None = None) -> None:
        self.data["status"] = status
        self.data["finished"] = _now()
        if grid is not None:
            self.data["grid"] = grid.name
        self.write()

    @property
    def image_count(self) -> int:
        return len(self.data["images"])


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a run manifest written by :class:`RunManifest`."""
    from ldm.files import read_text_file

    text = read_text_file(path, "run manifest")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SdgenError(f"the run manifest {path} is not valid JSON, truncated or damaged ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise SdgenError(f"{path} is not an sdgen run manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if data.get("format_version", 0) > MANIFEST_VERSION:
        raise SdgenError(f"{path} was written by a newer sdgen (manifest version {data['format_version']})")
    return data


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (the manifest's file references)."""
    return path.relative_to(root).as_posix()


def png_pixels(path: str | os.PathLike) -> np.ndarray:
    """The decoded pixels of a PNG as an array (for comparisons)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# ----------------------------------------------------------------------------- writing a run


class RunInterrupted(SdgenError):
    """Ctrl-C during a run, after the finished images were kept (exit code 130)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


@dataclass
class RunResult:
    """What a run wrote."""

    outdir: Path
    samples: list[Path]
    grid: Optional[Path]
    manifest: Path


class RunWriter:
    """Writes a run's images as they come: each sample PNG (watermarked, with its parameters) at once, its entry in
    the manifest (rewritten atomically after every image, so an interrupted run keeps it), the grid last.

    Args:
        out: the output folder; ``header``: the manifest's description of the run.
        safety: the run's :class:`ldm.safety.postprocess.OutputSafety` (checker verdicts, watermark).
        settings: the PNG parameters line (``Key: value`` pairs, :func:`format_parameters`); ``per_image(job)``
            adds an image's own entries; "Seed", "Batch size" and "Batch pos" are filled in per image.
        batch_sizes: the size of each batch (by the jobs' ``batch``).
    """

    def __init__(self, out: OutputFolder, header: Mapping[str, Any], safety: Any, settings: Mapping[str, Any], *,
                 batch_sizes: Mapping[int, int], skip_save: bool = False, skip_grid: bool = False, n_rows: int = 1,
                 per_image: Optional[Callable[[Any], Mapping[str, Any]]] = None) -> None:
        self.out, self.safety, self.settings = out, safety, dict(settings)
        self.batch_sizes, self.skip_save, self.skip_grid, self.n_rows = dict(batch_sizes), skip_save, skip_grid, n_rows
        self.per_image = per_image
        self.manifest = RunManifest(out.manifest_path, {**header, "safety": safety.manifest()})
        self.samples: list[Path] = []
        self.grid_images: list[np.ndarray] = []
        self.first_parameters: Optional[str] = None

    def write(self, image: Any) -> None:
        """Save one :class:`ldm.generation.generate.GeneratedImage` and record it in the manifest."""
        job = image.job
        parameters = format_parameters(job.prompt, job.negative_prompt, {
            **self.settings, "Seed": job.seed, "Batch size": self.batch_sizes[job.batch], "Batch pos": job.position,
            **(self.per_image(job) if self.per_image else {}), **self.safety.png_settings(image.flagged),
        })
        self.first_parameters = self.first_parameters or parameters
        file, digest = None, None
        if not self.skip_save:
            path, digest = self.out.save_sample(self.safety.mark(image.pixels), parameters)
            self.samples.append(path)
            file = relative_to(path, self.out.root)
        if image.flagged:
            logger.warning("the safety checker flagged image %d (seed %d)%s; it is saved black",
                           job.index, job.seed, f" ({file})" if file else "")
        if not self.skip_grid:
            self.grid_images.append(image.pixels)
        self.manifest.add_image(ImageRecord(job.index, job.seed, job.prompt, file, digest))

    def interrupted(self, total: int) -> RunInterrupted:
        """Finish the manifest as "interrupted" and return the error to raise (the written images stay)."""
        self.manifest.finish("interrupted")
        return RunInterrupted(f"interrupted: kept {self.manifest.image_count} of {total} images in {self.out.root} "
                              f"(manifest {self.out.manifest_path.name})")

    def failed(self) -> None:
        self.manifest.finish("failed")

    def complete(self) -> RunResult:
        """Write the grid (watermarked) and finish the manifest as "complete"."""
        grid = None
        if self.grid_images:
            grid = self.out.save_grid(self.grid_images, self.n_rows, self.first_parameters, postprocess=self.safety.mark)
        self.manifest.finish("complete", grid)
        return RunResult(outdir=self.out.root, samples=self.samples, grid=grid, manifest=self.out.manifest_path)

