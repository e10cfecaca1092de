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
JOB_KEY = "sdgen-job"
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


def save_png(image: np.ndarray, path: Path, parameters: str | None, job: Optional[Mapping[str, Any]] = None) -> str:
    """Write an (H, W, 3) uint8 array as PNG, with the parameters chunk when given and the job's record (JSON in an
    ``sdgen-job`` chunk: what a resumed run compares); returns the file's sha256. The file appears whole or not at
    all (written beside, then renamed)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    if job is not None:
        info.add_text(JOB_KEY, json.dumps(job, sort_keys=True, allow_nan=False))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_job(path: Path) -> Optional[dict[str, Any]]:
    """The job record of a sample PNG (its ``sdgen-job`` chunk), or None when the file is missing, damaged or has
    none: such an image counts as not made yet."""
    try:
        with Image.open(path) as image:
            image.verify()  # every chunk's CRC, up to IEND
        with Image.open(path) as image:
            text = image.text.get(JOB_KEY)  # type: ignore[attr-defined]
        return json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None


def make_xy_grid(cells: Mapping[tuple[int, int], Sequence[np.ndarray]], x_labels: Sequence[str],
                 y_labels: Sequence[str], padding: int = GRID_PADDING) -> np.ndarray:
    """An X/Y plot as AUTOMATIC1111 draws one: cell (y, x) holds that combination's images side by side, the X
    values label the columns on top and the Y values the rows on the left (white margins, black text)."""
    from PIL import ImageDraw, ImageFont

    first = next(iter(cells.values()))[0]
    h, w = first.shape[:2]
    per_cell = max(len(v) for v in cells.values())
    cell_w = per_cell * w + (per_cell - 1) * padding
    font = ImageFont.load_default()
    top = 28 if any(x_labels) else 0
    left = (8 + max((int(font.getlength(t)) for t in y_labels), default=0)) if any(y_labels) else 0
    rows, cols = max(1, len(y_labels)), max(1, len(x_labels))
    canvas = Image.new("RGB", (left + cols * (cell_w + padding) + padding, top + rows * (h + padding) + padding),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for (y, x), images in cells.items():
        x0, y0 = left + padding + x * (cell_w + padding), top + padding + y * (h + padding)
        for k, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (x0 + k * (w + padding), y0))
    for x, text in enumerate(x_labels):
        width = font.getlength(text)
        draw.text((left + padding + x * (cell_w + padding) + (cell_w - width) / 2, top / 2 - 6), text, fill="black",
                  font=font)
    for y, text in enumerate(y_labels):
        draw.text((4, top + padding + y * (h + padding) + h / 2 - 6), text, fill="black", font=font)
    return np.asarray(canvas).copy()


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

    Sample numbers continue after the highest existing ``samples/NNNNN.png``: image k of a run is
    ``samples/{first_sample + k:05}.png``; the grid and the manifest of a run share the next free run number.
    :meth:`continue_run` points the folder at an earlier run instead (``--resume``).
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
        self.first_sample = self.next_sample

    def latest_manifest(self) -> Optional[Path]:
        """The run manifest with the highest run number, None when the folder has none."""
        found = [(int(m.group(1)), p) for p in self.root.glob("run-*.json") if (m := _RUN_FILE.match(p.name))]
        return max(found)[1] if found else None

    def continue_run(self, run_number: int, first_sample: int) -> None:
        """Write into an earlier run: its manifest, grid and sample numbers."""
        self.run_number, self.first_sample = run_number, first_sample

    def sample_path(self, index: int) -> Path:
        """Where image ``index`` of this run is written: ``samples/{first_sample + index:05}.png``."""
        return self.samples / f"{self.first_sample + index:05}.png"

    def part_path(self, rank: int) -> Path:
        """The image records process ``rank`` appends while the run goes on (merged into the manifest)."""
        return self.root / f"run-{self.run_number:04}.part-{rank:03}.jsonl"

    @property
    def manifest_path(self) -> Path:
        return self.root / f"run-{self.run_number:04}.json"

    @property
    def grid_path(self) -> Path:
        return self.root / f"grid-{self.run_number:04}.png"

    def save_sample(self, image: np.ndarray, index: int, parameters: str | None,
                    job: Optional[Mapping[str, Any]] = None) -> tuple[Path, str]:
        """Write image ``index`` of the run (:meth:`sample_path`); returns (path, sha256 of the file)."""
        path = self.sample_path(index)
        return path, self._save(image, path, parameters, job)

    def save_grid(
        self,
        grid: np.ndarray,
        parameters: str | None,
        postprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    ) -> Path:
        """Write ``grid-NNNN.png`` of this run (``postprocess``, e.g. the watermark, applied to the whole grid)
        and return its path."""
        path = self.grid_path
        self._save(postprocess(grid) if postprocess is not None else grid, path, parameters)
        return path

    @staticmethod
    def _save(image: np.ndarray, path: Path, parameters: str | None, job: Optional[Mapping[str, Any]] = None) -> str:
        try:
            return save_png(image, path, parameters, job)
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
    tags: dict[str, str] | None = None  # the prompt line's metadata columns (e.g. I2P categories), if any

    def as_dict(self) -> dict:
        """The manifest's entry (no ``tags`` key when the line has none)."""
        return {k: v for k, v in vars(self).items() if k != "tags" or v}


class RunManifest:
    """The JSON record of a run, rewritten (atomically) after every image so an interrupted run keeps it.

    ``data`` holds: format, format_version, command, status (running | complete | interrupted | failed),
    created / finished (UTC ISO times), versions, options (every flag), model (config + checkpoint paths and
    hashes), seeds (planned, per image), prompts, images (written so far), grid.
    """

    def __init__(self, path: Path, header: Mapping[str, Any], images: Sequence[Mapping[str, Any]] = ()) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            **header,
            "status": "running",
            "created": _now(),
            "finished": None,
            "images": [dict(r) for r in images],
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
        self.data["images"].append(record.as_dict())
        self.write()

    def set_images(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replace the image list (one record per image index, in index order) and write."""
        by_index = {int(r["index"]): dict(r) for r in records}
        self.data["images"] = [by_index[k] for k in sorted(by_index)]
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
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def relative_to(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (the manifest's file references)."""
    return path.relative_to(root).as_posix()


def png_pixels(path: str | os.PathLike) -> np.ndarray:
    """The decoded pixels of a PNG as an array (for comparisons)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


@dataclass
class RunResult:
    """What a run wrote: its folder, the sample files of the run, the grid and the manifest."""

    outdir: Path
    samples: list[Path]
    grid: Optional[Path]
    manifest: Path

