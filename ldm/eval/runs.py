"""Finished runs as evaluation input: their images (from the run manifest), labels, and per-image result caches.

A run folder is an sdgen output folder (``--outdir``): its newest ``run-NNNN.json`` lists every written image with
its prompt, seed, file and tags (an I2P row's ``categories``). Per-image results are appended to a JSON-lines cache
in ``RUN/eval/`` as they are computed, each line keyed by the image file, its sha256 and the judge (e.g. the CLIP
weights' hash), so an interrupted or extended evaluation computes only what is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.errors import SdgenError


@dataclass(frozen=True)
class RunImage:
    """One image of a run: its file (absolute), sha256 (None: not recorded), prompt and tags."""

    file: Path
    sha256: str | None
    prompt: str
    tags: Mapping[str, str]


@dataclass(frozen=True)
class Run:
    """A finished run: its folder, manifest data, a label (its SLD preset or file, else the folder's name) and its
    images."""

    folder: Path
    data: Mapping[str, Any]
    label: str
    images: list[RunImage]


def read_run(folder: str | Path) -> Run:
    """The newest run in ``folder`` (raises SdgenError for a folder that holds no sdgen run)."""
    from ldm.output import load_manifest

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SdgenError(f"{folder} is not a folder (a run's --outdir)")
    found = [(int(p.stem.split("-")[1]), p) for p in root.glob("run-*.json") if p.stem.split("-")[1].isdigit()]
    manifest = max(found)[1] if found else None  # the newest run (reading changes nothing in the folder)
    if manifest is None:
        raise SdgenError(f"{folder} is not an sdgen run folder: it holds no run manifest (run-NNNN.json)")
    data = load_manifest(manifest)
    images = [RunImage(root / r["file"], r.get("sha256"), str(r.get("prompt", "")), dict(r.get("tags") or {}))
              for r in data.get("images") or [] if r.get("file")]
    if not images:
        raise SdgenError(f"{manifest} lists no saved image")
    sld = (data.get("options") or {}).get("sld") or {}
    label = f"SLD {sld['source']}" if sld.get("source") else root.name
    return Run(root, data, label, images)


def read_images(images: Sequence[RunImage]) -> torch.Tensor:
    """uint8 (N, 3, H, W) pixels of images of one size (SdgenError for a missing or unreadable file)."""
    from PIL import Image

    arrays = []
    for image in images:
        try:
            with Image.open(image.file) as pil:
                arrays.append(np.asarray(pil.convert("RGB")))
        except (OSError, ValueError) as exc:
            raise SdgenError(f"cannot read the run's image {image.file}: {exc}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ResultCache:
    """``RUN/eval/NAME.jsonl``: one line per judged image, ``{"file", "sha256", "key", **result}``; process r of a
    run of several writes ``NAME.rank{r}.jsonl``, and every reader reads them all."""

    def __init__(self, run: Run, name: str, key: str, rank: int = 0, processes: int = 1) -> None:
        folder = run.folder / "eval"
        self.path = folder / (f"{name}.jsonl" if processes == 1 else f"{name}.rank{rank}.jsonl")
        self.key = key
        self.results: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._cut = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                self._cut = handle.read(1) != b"\n"
        for part in sorted(folder.glob(f"{name}.jsonl")) + sorted(folder.glob(f"{name}.rank*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interruption
                if entry.get("key") == key:
                    self.results[(entry["file"], entry.get("sha256"))] = entry

    def _id(self, image: RunImage, run: Run) -> tuple[str, str | None]:
        return str(image.file.relative_to(run.folder)), image.sha256

    def missing(self, run: Run) -> list[RunImage]:
        return [image for image in run.images if self._id(image, run) not in self.results]

    def add(self, run: Run, pairs: Sequence[tuple[RunImage, Mapping[str, Any]]]) -> None:
        """Append results and sync them to disk (an interruption keeps every line written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            if self._cut:  # the last line of an interrupted evaluation: end it, so it stays one unreadable line
                handle.write("\n")
                self._cut = False
            for image, result in pairs:
                file, sha = self._id(image, run)
                entry = {"file": file, "sha256": sha, "key": self.key, **result}
                handle.write(json.dumps(entry) + "\n")
                self.results[(file, sha)] = entry
            handle.flush()
            os.fsync(handle.fileno())

    def get(self, run: Run, image: RunImage) -> Mapping[str, Any]:
        return self.results[self._id(image, run)]


def processes(devices: Optional[int], device: str = "cpu") -> Any:
    """The processes of an evaluation (:mod:`ldm.generation.distributed`, as generation runs use): this one alone,
    or ``devices`` of them started and connected by Lightning Fabric."""
    from ldm.generation.distributed import World, start

    if devices is None or devices == 1:
        return World()
    return start(devices, 1, "cpu" if device == "cpu" else "cuda", 300.0)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = ["ResultCache", "Run", "RunImage", "batches", "processes", "read_images", "read_run"]
