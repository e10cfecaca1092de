"""Prompt files: one prompt per line (.txt, as the original scripts), or one prompt with its own settings per line
(.csv with a header row, .jsonl with one JSON object per line).

Each line of a .csv / .jsonl file may set, besides ``prompt``: ``negative_prompt``, ``seed``, ``steps``, ``scale``,
``sampler``, ``eta``, ``H`` / ``W`` (or ``height`` / ``width``), ``n_samples``, ``strength``, ``init_img`` and the
SLD settings (``sld``, ``sld_guidance_scale``, ``sld_warmup_steps``, ``sld_threshold``, ``sld_momentum_scale``,
``sld_momentum_beta``, ``safety_concept``). Empty cells and missing keys take the command's flags. Every line is
checked here (names and types) and again against the model once the plan knows it; a bad line is one error naming
the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    "sld": _text, "sld_guidance_scale": _float, "sld_warmup_steps": _int, "sld_threshold": _float,
    "sld_momentum_scale": _float, "sld_momentum_beta": _float, "safety_concept": _text, "clip_skip": _int,
    "schedule": _text, "noise_level": _int, "prior_steps": _int, "prior_scale": _float,
}
#: Other spellings of the fields (the flags' names).
ALIASES = {"H": "height", "W": "width", "negative-prompt": "negative_prompt", "ddim_steps": "steps",
           "n-samples": "n_samples", "init-img": "init_img", "ddim_eta": "eta",
           "clip-skip": "clip_skip", "noise-level": "noise_level", "prior-steps": "prior_steps",
           "prior-scale": "prior_scale"}
SLD_FIELDS = ("sld", "sld_guidance_scale", "sld_warmup_steps", "sld_threshold", "sld_momentum_scale",
              "sld_momentum_beta", "safety_concept")


@dataclass(frozen=True)
class PromptEntry:
    """One prompt of a run and the settings its line sets (``overrides``: field -> value); ``where`` names it in
    messages ("prompts.csv:7", or "--prompt")."""

    prompt: str
    where: str
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)


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


def _entries_from_rows(rows: list[tuple[int, dict[str, Any]]], name: str) -> list[PromptEntry]:
    entries = []
    for line, raw in rows:
        where = f"{name}:{line}"
        values = parse_fields(raw, where)
        prompt = values.pop("prompt", None)
        if prompt is None or not str(prompt).strip():
            raise SdgenError(f"{where}: the line has no prompt")
        entries.append(PromptEntry(str(prompt).strip(), where, values))
    return entries


def read_prompt_file(path: str | Path) -> list[PromptEntry]:
    """The prompts of a prompt file, by its suffix: .csv (header row), .jsonl (one object per line), anything else
    one prompt per line (blank lines skipped). Raises SdgenError naming the file and line of a bad line."""
    from ldm.files import read_text_file

    p = Path(path)
    text = read_text_file(p, "prompt file")
    name = p.name
    suffix = p.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "prompt" not in [f.strip() for f in reader.fieldnames]:
            raise SdgenError(f"{name}:1: the header row must name a 'prompt' column (got {reader.fieldnames})")
        parse_fields({column: None for column in reader.fieldnames}, f"{name}:1")  # unknown columns
        rows = []
        for row in reader:
            if None in row:
                raise SdgenError(f"{name}:{reader.line_num}: more cells than the header has columns")
            if any(v and v.strip() for v in row.values()):
                rows.append((reader.line_num, dict(row)))
        entries = _entries_from_rows(rows, name)
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
