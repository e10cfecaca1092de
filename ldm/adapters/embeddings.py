"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors added to a model's text encoders.

The trigger word is the file's stem (AUTOMATIC1111's rule); a prompt that names it gets the file's vectors at
that place, one token position per vector. File layouts read (from the formats' documentation):

* AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}``;
* ``.safetensors`` (A1111): ``{"emb_params": (n, D)}``;
* diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": (D,) or (n, D)}``, one entry;
* SDXL: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one tensor per text encoder.

Pickle files go through sdgen's safe reader (``torch.load(weights_only=True)`` with an allow-list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ldm.errors import SdgenError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_TRIGGER = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class Embedding:
    """An embedding file's trigger word and its vectors: one (n, D) tensor, or per encoder width for SDXL."""

    name: str
    vectors: tuple[torch.Tensor, ...]


def _tensors_of(path: Path) -> Mapping[str, Any]:
    from ldm.checkpoint_reader import is_safetensors, read_pickle_checkpoint, read_state_dict

    if is_safetensors(path):
        return read_state_dict(path, "embedding file")
    obj = read_pickle_checkpoint(path, "embedding file")
    if not isinstance(obj, Mapping):
        raise SdgenError(f"the embedding file {path} holds a {type(obj).__name__}, not an embedding")
    return obj


def _as_matrix(value: Any, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.numel() == 0:
        raise SdgenError(f"the embedding file {path} holds no (vectors x width) tensor")
    return value.detach().float().reshape(-1, value.shape[-1])


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in ``path`` (module docstring formats); raises SdgenError for anything else."""
    path = Path(path)
    name = path.stem
    if not _TRIGGER.match(name):
        raise SdgenError(f"the embedding file {path.name}: its name {name!r} cannot be a prompt word "
                         "(letters, digits, _ . + - only)")
    data = _tensors_of(path)
    if "clip_l" in data or "clip_g" in data:
        return Embedding(name, tuple(_as_matrix(data[k], path) for k in ("clip_l", "clip_g") if k in data))
    if "string_to_param" in data:
        params = data["string_to_param"]
        values = list(params.values()) if isinstance(params, Mapping) else []
        if len(values) != 1:
            raise SdgenError(f"the embedding file {path} has {len(values)} entries in string_to_param, not one")
        return Embedding(name, (_as_matrix(values[0], path),))
    if "emb_params" in data:
        return Embedding(name, (_as_matrix(data["emb_params"], path),))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vector}
        return Embedding(name, (_as_matrix(next(iter(tensors.values())), path),))
    keys = ", ".join(list(map(str, data))[:4])
    raise SdgenError(f"the embedding file {path} is not a textual-inversion embedding (keys: {keys}); sdgen reads "
                     "A1111 string_to_param / emb_params, diffusers {token: vector} and SDXL clip_l / clip_g files")


def find_embeddings(paths: Sequence[str], directory: str | Path | None) -> list[Path]:
    """The embedding files of a run: each ``--embedding`` and every embedding file in ``directory`` (its
    subfolders too), without duplicates; a name given twice is refused."""
    from ldm.files import require_file

    files = [require_file(p, "embedding file") for p in paths]
    if directory is not None and Path(directory).expanduser().is_dir():
        for p in sorted(Path(directory).expanduser().rglob("*")):
            if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and p.resolve() not in {f.resolve() for f in files}:
                files.append(p)
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise SdgenError(f"two embeddings have the trigger word {p.stem!r}: {seen[p.stem]} and {p}")
        seen[p.stem] = p
    return files


def register(encoders: Sequence[Any], embedding: Embedding) -> None:
    """Register ``embedding`` in each text encoder whose token width one of its tensors has (SDXL: clip_l in the
    768-wide CLIP-L, clip_g in the 1280-wide bigG). Raises SdgenError when it fits none, or only some of several
    encoders (an SD 1.x embedding on SDXL)."""
    widths = [int(e._token_embedding().embedding_dim) for e in encoders]
    fitted = []
    for encoder, width in zip(encoders, widths):
        vectors = [v for v in embedding.vectors if v.shape[1] == width]
        if vectors:
            fitted.append((encoder, vectors[0]))
    have = sorted({int(v.shape[1]) for v in embedding.vectors})
    if not encoders or len(fitted) != len(encoders):
        raise SdgenError(f"the embedding {embedding.name!r} has vectors of width {', '.join(map(str, have))}; this "
                         f"model's text encoders take {', '.join(map(str, widths)) or 'none'} "
                         "(an embedding for another model family)")
    counts = {int(v.shape[0]) for _, v in fitted}
    if len(counts) != 1:
        raise SdgenError(f"the embedding {embedding.name!r} has a different number of vectors per text encoder")
    for encoder, vectors in fitted:
        encoder.register_embedding(embedding.name, vectors)


__all__ = ["Embedding", "read_embedding", "find_embeddings", "register", "EMBEDDING_SUFFIXES"]
