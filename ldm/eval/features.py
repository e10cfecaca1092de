"""Per-image results of FID / KID and CLIP score, cached in the run folder as they are computed.

The images of a run (and of a reference folder) are cut into fixed chunks; chunk j is computed by process
``j mod N`` (``--devices N``) and written at once (atomically) to ``RUN/eval/``, so an interrupted or extended
evaluation computes only the missing chunks and the numbers do not depend on N:

- Inception features: one ``.npy`` per chunk under ``RUN/eval/features-KEY/`` (``KEY``: the network's weights);
  the reference folder's under ``RUN/eval/reference-KEY-REFKEY/`` (``REFKEY``: its files and sizes);
- CLIP scores: one line per image in ``RUN/eval/clip-score.jsonl`` (:class:`ldm.eval.runs.ResultCache`), the
  per-pair score of torchmetrics' CLIP score (``100 * cos``, before its mean and clamp).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ldm.eval.runs import ResultCache, Run, RunImage, batches, read_images

CHUNK = 32


def _world(world: Any) -> Any:
    from ldm.generation.distributed import World

    return world or World()


def reference_run(folder: str | Path) -> Run:
    """A folder of reference images as a :class:`Run` (images only)."""
    from ldm.errors import SdgenError
    from ldm.generation.images import image_paths

    paths = image_paths(str(folder))
    if len(paths) < 2:
        raise SdgenError(f"--ref {folder}: FID / KID need at least 2 reference images, found {len(paths)}")
    return Run(Path(folder), {}, Path(folder).name, [RunImage(Path(p), None, "", {}) for p in paths])


def reference_key(run: Run) -> str:
    """What identifies a reference folder's contents: its files' names, sizes and modification times."""
    h = hashlib.sha256()
    for image in run.images:
        stat = image.file.stat()
        h.update(f"{image.file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_resized(images: Sequence[RunImage], size: int = 299) -> torch.Tensor:
    """uint8 (N, 3, size, size): each image resized (bilinear, antialiased) on reading, so images of any size stack."""
    return torch.cat([F.interpolate(read_images([image]).float(), size=(size, size), mode="bilinear",
                                    antialias=True).round().clamp(0, 255).byte() for image in images])


def features(run: Run, network: torch.nn.Module, folder: Path, *, world: Any = None, resize: bool = False,
             on_chunk: Optional[Callable[[int], None]] = None) -> Optional[np.ndarray]:
    """The network's features of every image of ``run`` (N, D), cached per chunk in ``folder``; this process
    computes its missing chunks, then waits for the others. None in processes other than 0."""
    world = _world(world)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = list(batches(run.images, CHUNK))
    for j, chunk in enumerate(chunks):
        path = folder / f"chunk-{j:06d}.npy"
        if path.is_file() or not world.owns(j):
            continue
        pixels = read_resized(chunk) if resize else read_images(chunk)
        with torch.no_grad():
            values = network(pixels).double().cpu().numpy()
        tmp = path.with_suffix(f".tmp{world.rank}.npy")
        np.save(tmp, values)
        os.replace(tmp, path)
        if on_chunk is not None:
            on_chunk(len(chunk))
    world.wait_for_all()
    if not world.is_main:
        return None
    return np.concatenate([np.load(folder / f"chunk-{j:06d}.npy") for j in range(len(chunks))])


def clip_scores(run: Run, loader: Callable[[], tuple[Any, Any]], key: str, *, world: Any = None,
                on_chunk: Optional[Callable[[int], None]] = None) -> Optional[ResultCache]:
    """Each image's CLIP score against its prompt (torchmetrics' per-pair value), cached per image."""
    try:  # the per-pair score of torchmetrics' CLIPScore.update
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    except ImportError:
        from ldm.errors import SdgenError
        from ldm.eval.metrics import EXTRA_HINT

        raise SdgenError(f"CLIP score needs the eval extra: {EXTRA_HINT}") from None

    world = _world(world)
    cache = ResultCache(run, "clip-score", key, world.rank, world.size)
    missing = {id(image) for image in cache.missing(run)}
    model, processor = None, None
    for j, chunk in enumerate(batches(run.images, CHUNK)):
        todo = [image for image in chunk if id(image) in missing]
        if not todo or not world.owns(j):
            continue
        if model is None:
            model, processor = loader()
        with torch.no_grad():
            score, _ = _clip_score_update(list(read_images(todo)), [image.prompt for image in todo], model, processor)
        cache.add(run, [(image, {"clip_score": float(s)}) for image, s in zip(todo, score)])
        if on_chunk is not None:
            on_chunk(len(todo))
    world.wait_for_all()
    return ResultCache(run, "clip-score", key) if world.is_main else None


__all__ = ["CHUNK", "clip_scores", "features", "read_resized", "reference_key", "reference_run"]
