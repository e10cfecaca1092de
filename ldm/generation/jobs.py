"""Laying a run out as image jobs: prompt entries x sweep cells x iterations -> ordered jobs -> batches.

Order (what the global index counts): sweep cells (Y outer, X inner), then iterations (``--n_iter``), then the
units of one iteration (each init image of an unCLIP folder, each prompt entry), then the images of a unit.
Image k of a cell has seed ``seed + k`` (its unit's own seed when the prompt file sets one; image k of each batch
with ``--fixed_code``). Consecutive jobs of one cell and iteration with equal settings, init image and batch size
form batches of that size, so a batch never depends on how the run is split over processes.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ldm.errors import SdgenError
from ldm.generation.prompt_file import FIELDS, PromptEntry
from ldm.generation.request import ImageJob, Settings

#: What ``--sweep FIELD=V1,V2,...`` may vary.
SWEEP_FIELDS = ("steps", "scale", "sampler", "seed", "eta", "strength", "negative_prompt", "height", "width",
                "noise_level", "sld_guidance_scale", "sld_warmup_steps", "sld_threshold", "sld_momentum_scale",
                "sld_momentum_beta", "clip_skip", "schedule", "prior_steps", "prior_scale")
SWEEP_LABELS = {"steps": "Steps", "scale": "CFG scale", "sampler": "Sampler", "seed": "Seed", "eta": "Eta",
                "strength": "Denoising strength", "negative_prompt": "Negative prompt", "height": "Height",
                "width": "Width", "noise_level": "Noise level", "clip_skip": "Clip skip",
                "schedule": "Schedule type", "prior_steps": "Prior steps", "prior_scale": "Prior scale"}


@dataclass(frozen=True)
class Sweep:
    """One axis of a sweep: a field and its values (X is the first ``--sweep``, Y the second)."""

    field: str
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        return SWEEP_LABELS.get(self.field, self.field)


def parse_sweep(text: str) -> Sweep:
    """``"scale=4,6,8"`` -> Sweep("scale", (4.0, 6.0, 8.0)); values are comma-separated (quote one with commas)."""
    name, sep, values = str(text).partition("=")
    name = {"H": "height", "W": "width", "cfg": "scale"}.get(name.strip(), name.strip())
    if not sep or name not in SWEEP_FIELDS:
        raise SdgenError(f"--sweep takes FIELD=V1,V2,... with FIELD one of {', '.join(SWEEP_FIELDS)}; got {text!r}")
    cells = next(csv.reader([values], skipinitialspace=True), [])
    convert = FIELDS.get(name, FIELDS["steps"] if name == "noise_level" else FIELDS["scale"])
    try:
        parsed = tuple(convert(v.strip()) if name != "negative_prompt" else v for v in cells if v.strip() != "")
    except ValueError as exc:
        raise SdgenError(f"--sweep {name}: values must be {exc}") from None
    if not parsed:
        raise SdgenError(f"--sweep {name} has no values")
    if len(set(parsed)) != len(parsed):
        raise SdgenError(f"--sweep {name} repeats a value: {values}")
    return Sweep(name, parsed)


def sweep_cells(sweeps: Sequence[Sweep]) -> list[dict[str, Any]]:
    """The settings of each cell of the X/Y plot, Y outer and X inner ([{}] without sweeps)."""
    if len(sweeps) > 2:
        raise SdgenError("at most two --sweep axes (X and Y)")
    if len({s.field for s in sweeps}) != len(sweeps):
        raise SdgenError("the two --sweep axes vary the same field")
    axes = list(reversed(sweeps))  # Y outer
    return [dict(zip((s.field for s in axes), combo)) for combo in itertools.product(*(s.values for s in axes))]


@dataclass(frozen=True)
class Unit:
    """What one iteration of a cell renders for one prompt entry: ``count`` images of ``entry`` with ``settings``
    (and init image ``init_image``), in batches of ``batch_size``; ``seed`` is the entry's own seed, if any."""

    entry: PromptEntry
    settings: Settings
    count: int
    batch_size: int
    negative_prompt: str
    init_image: Optional[int] = None
    seed: Optional[int] = None
    cell: tuple[tuple[str, Any], ...] = field(default=())


def lay_out(cells: Sequence[tuple[int, Sequence[Unit]]], n_iter: int, *,
            fixed_code: bool = False) -> list[list[ImageJob]]:
    """The ordered batches of a run: for each cell (its base seed, its units in order), ``n_iter`` iterations of
    its units' images (module docstring)."""
    batches: list[list[ImageJob]] = []
    index = 0
    for seed, units in cells:
        cell_start = index
        own_seed_used: dict[int, int] = {}
        for _ in range(n_iter):
            current: list[ImageJob] = []
            key = None
            for u, unit in enumerate(units):
                unit_key = (unit.settings, unit.init_image, unit.batch_size, unit.cell)
                for _k in range(unit.count):
                    if current and (unit_key != key or len(current) >= unit.batch_size):
                        batches.append(current)
                        current = []
                    key = unit_key
                    position = len(current)
                    if fixed_code:
                        job_seed = (unit.seed if unit.seed is not None else seed) + position
                    elif unit.seed is not None:
                        job_seed = unit.seed + own_seed_used.get(u, 0)
                        own_seed_used[u] = own_seed_used.get(u, 0) + 1
                    else:
                        job_seed = seed + (index - cell_start)
                    current.append(ImageJob(index, job_seed, unit.entry.prompt, unit.negative_prompt,
                                            unit.init_image, len(batches), position, unit.settings, unit.cell,
                                            unit.entry.where))
                    index += 1
            if current:
                batches.append(current)
    return batches
