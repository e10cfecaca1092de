"""``sdgen inspect FILE [--json]``: what a weight file is, without loading a model.

One line per fact (or one JSON object with ``--json``): the kind :func:`ldm.model_id.identify_file` finds (a
checkpoint's family, bundled config, prediction, role and the command that runs it; or a LoRA, textual-inversion
or VAE file and the flag that takes it), the tensors' dtypes, their element count, AUTOMATIC1111's model hash
(the first 10 hex digits of the sha256) and the reasons of the identification. Only the header of a .safetensors
file is read; a pickle checkpoint is loaded through the allow-list of ``ldm.checkpoint_reader``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from ldm.errors import SdgenError


def inspect_file(path: Path) -> dict[str, Any]:
    """The facts ``sdgen inspect`` prints, as a dict (JSON-ready).

    Keys: file, kind, name, family, config, prediction, role, command (None for adapters), use (how to pass an
    adapter file), dtype (list, most common first), parameters (tensor elements, buffers included), model_hash
    (10 hex digits), sha256 (64), reasons (list).

    Raises:
        SdgenError: a missing, empty, truncated or unreadable file, or one whose keys no rule recognises.
    """
    from ldm.model_files import file_sha256
    from ldm.model_id import KINDS, identify_file, read_header

    identity = identify_file(path, "file")
    header = read_header(path, "file")
    if identity.kind is None:
        first = ", ".join(list(header.shapes)[:3])
        raise SdgenError(f"{path.name} is not a checkpoint, LoRA, embedding or VAE file sdgen recognises "
                         f"({len(header.shapes)} tensors, e.g. {first})")
    info = KINDS[identity.kind]
    sha256 = file_sha256(path)
    return {
        "file": path.name, "kind": identity.kind, "name": identity.name, "family": identity.family,
        "config": identity.config, "prediction": identity.prediction, "role": identity.role,
        "command": identity.command, "use": None if identity.is_checkpoint else info.hint,
        "dtype": [name for name, _ in Counter(header.dtypes.values()).most_common()],
        "parameters": header.parameters, "model_hash": sha256[:10], "sha256": sha256,
        "reasons": list(identity.reasons),
    }


def format_facts(facts: dict[str, Any]) -> list[str]:
    """The lines of the plain output: ``label: value``, facts that do not apply (None) left out."""
    lines = []
    for key in ("file", "kind", "name", "family", "config", "prediction", "role", "command", "use"):
        if facts.get(key) is not None:
            lines.append(f"{key}: {facts[key]}")
    lines += [f"dtype: {', '.join(facts['dtype'])}", f"parameters: {facts['parameters']:,}",
              f"model hash: {facts['model_hash']}", f"reasons: {'; '.join(facts['reasons'])}"]
    return lines


def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="a .safetensors or .ckpt file (checkpoint, LoRA, "
                                                             "textual-inversion embedding or VAE)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of lines")] = False,
) -> None:
    """Say what a weight file is: kind, family, config, prediction, command, dtype, size and model hash."""
    facts = inspect_file(file)
    if as_json:
        typer.echo(json.dumps(facts))
    else:
        typer.echo("\n".join(format_facts(facts)))
