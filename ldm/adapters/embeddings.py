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
from typing import Any, Mapping, Optional, Sequence

import torch

from ldm.errors import SdgenError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_FOLDER_FILE = 64 * 2**20  # bytes: larger files in an embeddings folder are checkpoints or LoRAs, not embeddings
_TRIGGER = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class Embedding:
    """An embedding file's trigger word and its vectors (n, D): ``{"*": t}`` for one text encoder, or SDXL's
    ``{"clip_l": t, "clip_g": t}`` (CLIP ViT-L and OpenCLIP bigG)."""

    name: str
    vectors: dict[str, torch.Tensor]

    def for_encoder(self, encoder: Any) -> Optional[torch.Tensor]:
        """The vectors ``encoder`` takes: the single tensor if its width fits, else SDXL's part for its kind
        (transformers CLIP: clip_l, OpenCLIP: clip_g); None when none fits."""
        width = int(encoder._token_embedding().embedding_dim)
        key = "clip_l" if hasattr(encoder, "transformer") else "clip_g"
        value = self.vectors.get("*", self.vectors.get(key))
        return value if value is not None and int(value.shape[1]) == width else None


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
        return Embedding(name, {k: _as_matrix(data[k], path) for k in ("clip_l", "clip_g") if k in data})
    if "string_to_param" in data:
        params = data["string_to_param"]
        values = list(params.values()) if isinstance(params, Mapping) else []
        if len(values) != 1:
            raise SdgenError(f"the embedding file {path} has {len(values)} entries in string_to_param, not one")
        return Embedding(name, {"*": _as_matrix(values[0], path)})
    if "emb_params" in data:
        return Embedding(name, {"*": _as_matrix(data["emb_params"], path)})
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vector}
        return Embedding(name, {"*": _as_matrix(next(iter(tensors.values())), path)})
    keys = ", ".join(list(map(str, data))[:4])
    raise SdgenError(f"the embedding file {path} is not a textual-inversion embedding (keys: {keys}); sdgen reads "
                     "A1111 string_to_param / emb_params, diffusers {token: vector} and SDXL clip_l / clip_g files")


def find_embeddings(paths: Sequence[str], directory: str | Path | None) -> list[Path]:
    """The embedding files of a run: each ``--embedding`` and every embedding-sized file (at most
    :data:`MAX_FOLDER_FILE`) in ``directory`` and its subfolders, without duplicates; a name given twice is
    refused."""
    from ldm.files import require_file

    files = [require_file(p, "embedding file") for p in paths]
    if directory is not None and Path(directory).expanduser().is_dir():
        for p in sorted(Path(directory).expanduser().rglob("*")):
            if (p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and p.stat().st_size <= MAX_FOLDER_FILE
                    and p.resolve() not in {f.resolve() for f in files}):
                files.append(p)
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise SdgenError(f"two embeddings have the trigger word {p.stem!r}: {seen[p.stem]} and {p}")
        seen[p.stem] = p
    return files


def check_fits(encoders: Sequence[Any], embedding: Embedding) -> list[tuple[Any, torch.Tensor]]:
    """(encoder, vectors) for each text encoder; raises SdgenError when the embedding fits not all of them (one
    made for another family) or gives them different numbers of vectors."""
    fitted = [(encoder, embedding.for_encoder(encoder)) for encoder in encoders]
    if not encoders or any(v is None for _, v in fitted):
        have = ", ".join(f"{k} {int(v.shape[1])}" if k != "*" else str(int(v.shape[1]))
                         for k, v in embedding.vectors.items())
        widths = ", ".join(str(int(e._token_embedding().embedding_dim)) for e in encoders) or "none"
        raise SdgenError(f"the embedding {embedding.name!r} has vectors of width {have}; this model's text encoders "
                         f"take {widths} (an embedding for another model family)")
    if len({int(v.shape[0]) for _, v in fitted}) != 1:
        raise SdgenError(f"the embedding {embedding.name!r} has a different number of vectors per text encoder")
    return fitted  # type: ignore[return-value]


def register(encoders: Sequence[Any], embedding: Embedding) -> None:
    """Register ``embedding`` in every text encoder (:func:`check_fits`): its vectors become new tokens."""
    for encoder, vectors in check_fits(encoders, embedding):
        encoder.register_embedding(embedding.name, vectors)


__all__ = ["Embedding", "read_embedding", "find_embeddings", "register", "check_fits", "EMBEDDING_SUFFIXES"]
