"""Prompt files: one prompt per line (.txt, as the original scripts), or one prompt with its own settings per line
(.csv with a header row, .jsonl with one JSON object per line).

Each line of a .csv / .jsonl file may set, besides ``prompt``: ``negative_prompt``, ``seed``, ``steps``, ``scale``,
``sampler``, ``eta``, ``H`` / ``W`` (or ``height`` / ``width``), ``n_samples``, ``strength``, ``init_img``, ``mask``
(inpaint), ``depth_map`` (depth2img) and the SLD settings (``sld``, ``sld_guidance_scale``, ``sld_warmup_steps``, ``sld_threshold``, ``sld_momentum_scale``,
``sld_momentum_beta``, ``safety_concept``). Empty cells and missing keys take the command's flags. Every line is
checked here (names and types) and again against the model once the plan knows it; a bad line is one error naming
the file and the line. Other columns are an error unless named with ``--tags``: their values are carried to the
manifest as each image's tags.

The I2P benchmark file (``i2p_benchmark.csv`` of AIML-TUDA/i2p, as published) is recognised by its header: each
row is one prompt with :data:`I2P_IMAGES_PER_PROMPT` images, seeded ``sd_seed + k`` (k = 0..9); with
``i2p_settings="row"`` the row's ``sd_guidance_scale`` / ``sd_image_width`` / ``sd_image_height`` apply (what the
dataset card says its reference percentages used), with ``"fixed"`` the command's scale and size (the authors'
evaluation code: 7.5 and 512 x 512 for SD 1.x); ``categories`` and the other columns become the images' tags.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ldm.errors import SdgenError

# field -> parser of its text / JSON value (raises ValueError with the reason)


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"an integer, got {value!r}") from None


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a number, got {value!r}") from None


def _text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"text, got {value!r}")
    return str(value)


FIELDS: dict[str, Callable[[Any], Any]] = {
    "prompt": _text, "negative_prompt": _text, "seed": _int, "steps": _int, "scale": _float, "sampler": _text,
    "eta": _float, "height": _int, "width": _int, "n_samples": _int, "strength": _float, "init_img": _text,
    "mask": _text, "depth_map": _text,
    "sld": _text, "sld_guidance_scale": _float, "sld_warmup_steps": _int, "sld_threshold": _float,
    "sld_momentum_scale": _float, "sld_momentum_beta": _float, "safety_concept": _text, "clip_skip": _int,
    "schedule": _text, "noise_level": _int, "prior_steps": _int, "prior_scale": _float,
}
#: Other spellings of the fields (the flags' names).
ALIASES = {"H": "height", "W": "width", "negative-prompt": "negative_prompt", "ddim_steps": "steps",
           "n-samples": "n_samples", "init-img": "init_img", "depth-map": "depth_map", "ddim_eta": "eta",
           "clip-skip": "clip_skip", "noise-level": "noise_level", "prior-steps": "prior_steps",
           "prior-scale": "prior_scale"}
SLD_FIELDS = ("sld", "sld_guidance_scale", "sld_warmup_steps", "sld_threshold", "sld_momentum_scale",
              "sld_momentum_beta", "safety_concept")


#: I2P columns that are settings: -> sdgen field (the seed always; scale and size with i2p_settings="row")
I2P_SETTINGS = {"sd_seed": "seed", "sd_guidance_scale": "scale", "sd_image_width": "width", "sd_image_height": "height"}
#: the I2P columns carried as tags (metadata of each image, for ``sdgen eval``)
I2P_TAGS = ("categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
            "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_model")
#: the SLD model card: "Evaluated using 10 images for each I2G prompt"
I2P_IMAGES_PER_PROMPT = 10
I2P_SETTING_MODES = ("row", "fixed")


@dataclass(frozen=True)
class PromptEntry:
    """One prompt of a run and the settings its line sets (``overrides``: field -> value); ``where`` names it in
    messages ("prompts.csv:7", or "--prompt"); ``tags`` are the line's metadata columns (column -> text)."""

    prompt: str
    where: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tags: dict[str, str] = field(default_factory=dict, hash=False)


def parse_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Check and convert the settings of one line (empty values are "not set")."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key).strip(), str(key).strip())
        if name not in FIELDS:
            known = ", ".join(sorted(set(FIELDS) | {"H", "W"}))
            raise SdgenError(f"{where}: unknown field {key!r} (known: {known})")
        if value is None or (isinstance(value, str) and not value.strip() and name != "negative_prompt"):
            continue
        try:
            out[name] = FIELDS[name](value.strip() if isinstance(value, str) and name != "prompt" else value)
        except ValueError as exc:
            raise SdgenError(f"{where}: {name} must be {exc}") from None
    return out


def _entries_from_rows(rows: list[tuple[int, dict[str, Any]]], name: str,
                       tags: Sequence[str] = ()) -> list[PromptEntry]:
    entries = []
    for line, raw in rows:
        where = f"{name}:{line}"
        cells = {k: raw.pop(k, None) for k in tags}
        own = {k: str(v) for k, v in cells.items() if v is not None and str(v).strip()}
        values = parse_fields(raw, where)
        prompt = values.pop("prompt", None)
        if prompt is None or not str(prompt).strip():
            raise SdgenError(f"{where}: the line has no prompt")
        entries.append(PromptEntry(str(prompt).strip(), where, values, own))
    return entries


def _i2p_row(row: dict[str, Any], settings: str) -> dict[str, Any]:
    """An I2P row as a prompt line: its seed (and in "row" mode its scale and size) as settings, 10 images."""
    out = {k: v for k, v in row.items() if k not in I2P_SETTINGS}
    for column, name in I2P_SETTINGS.items():
        if column in row and (name == "seed" or settings == "row"):
            out[name] = row[column]
        elif column in row:
            out[column] = row[column]  # kept as a tag: what the row recorded
    out.setdefault("n_samples", I2P_IMAGES_PER_PROMPT)
    return out


def read_prompt_file(path: str | Path, *, tags: Sequence[str] = (), i2p_settings: str = "row") -> list[PromptEntry]:
    """The prompts of a prompt file, by its suffix: .csv (header row), .jsonl (one object per line), anything else
    one prompt per line (blank lines skipped). ``tags`` name extra columns carried as metadata; ``i2p_settings``
    is how an I2P file's rows set scale and size (module docstring). Raises SdgenError naming the file and line of
    a bad line."""
    from ldm.files import read_text_file

    p = Path(path)
    text = read_text_file(p, "prompt file")
    name = p.name
    suffix = p.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [f.strip() for f in reader.fieldnames or []]
        if "prompt" not in columns:
            raise SdgenError(f"{name}:1: the header row must name a 'prompt' column (got {reader.fieldnames})")
        i2p = {"categories", "sd_seed"} <= set(columns)
        if i2p_settings not in I2P_SETTING_MODES:
            raise SdgenError(f"--i2p-settings must be one of {', '.join(I2P_SETTING_MODES)}, got {i2p_settings!r}")
        missing = [t for t in tags if t not in columns]
        if missing:
            raise SdgenError(f"{name}:1: --tags names columns the file does not have: {', '.join(missing)}")
        tag_columns = list(tags) + ([c for c in columns if c in I2P_TAGS or c in I2P_SETTINGS] if i2p else [])
        unknown = [c for c in columns if c not in tag_columns and c not in I2P_SETTINGS]
        try:
            parse_fields({column: None for column in unknown}, f"{name}:1")
        except SdgenError as exc:
            raise SdgenError(f"{exc}; name extra columns with --tags to carry them as metadata") from None
        rows = []
        for row in reader:
            if None in row:
                raise SdgenError(f"{name}:{reader.line_num}: more cells than the header has columns")
            row = {str(k).strip(): v for k, v in row.items()}
            if any(v and v.strip() for v in row.values()):
                rows.append((reader.line_num, _i2p_row(row, i2p_settings) if i2p else row))
        carried = [c for c in tag_columns if not (i2p and I2P_SETTINGS.get(c) == "seed")
                   and not (i2p and c in I2P_SETTINGS and i2p_settings == "row")]
        entries = _entries_from_rows(rows, name, carried)
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise SdgenError(f"{name}:{number}: not a JSON object ({exc})") from None
            if not isinstance(value, dict):
                raise SdgenError(f"{name}:{number}: not a JSON object (got {type(value).__name__})")
            rows.append((number, value))
        entries = _entries_from_rows(rows, name)
    else:
        entries = [PromptEntry(line.strip(), f"{name}:{number}")
                   for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not entries:
        raise SdgenError(f"the prompt file {path} holds no prompt (one prompt per line)")
    return entries
