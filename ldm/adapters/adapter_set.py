"""The adapter files of a run: LoRAs, textual-inversion embeddings and a replacement VAE.

:func:`plan_adapters` finds and checks them before any model is loaded (against the model built on the meta
device: every LoRA layer must name a weight of the model with a fitting shape, every embedding must fit the text
encoders, the VAE the first stage) and hashes them; :func:`apply_adapters` changes a loaded model: LoRAs merged
into the weights of the first model of the run (the SDXL base, or the refiner alone), embeddings registered in
every model's text encoders that take their width, the VAE replacing every model's first stage.

LoRAs come from ``--lora PATH[:WEIGHT]`` and from ``<lora:NAME:WEIGHT>`` tags in the prompts (AUTOMATIC1111
syntax only), NAME being a file stem in ``--lora-dir``. The weights are merged once, so a run applies one set:
prompt lines that ask for different sets are refused (split them into runs).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from torch import nn

from ldm.adapters import embeddings as ti
from ldm.adapters import lora as lora_io
from ldm.adapters.lora_keys import lora_targets
from ldm.adapters.vae import check_vae, read_vae, replace_vae
from ldm.errors import SdgenError
from ldm.modules.encoders.prompt_syntax import extract_lora_tags

logger = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class AdapterFile:
    """A file the run applies: its path, name (the file stem: LoRA name, trigger word), sha256 and, for a LoRA,
    its weight and where it was asked for ("--lora" or "prompt")."""

    path: Path
    name: str
    sha256: str
    weight: float = 1.0
    source: str = ""

    def record(self) -> dict[str, Any]:
        out = {"path": str(self.path.resolve()), "name": self.name, "sha256": self.sha256}
        if self.source:
            out.update(weight=self.weight, source=self.source)
        return out


@dataclass(frozen=True)
class Adapters:
    """A run's checked adapter files (empty: none)."""

    loras: tuple[AdapterFile, ...] = ()
    embeddings: tuple[AdapterFile, ...] = ()
    vae: Optional[AdapterFile] = None
    lora_layers: dict = field(default_factory=dict, compare=False, repr=False)

    def files(self) -> list[AdapterFile]:
        return list(self.loras) + list(self.embeddings) + ([self.vae] if self.vae is not None else [])

    def sha256(self) -> list[str]:
        """What decides pixels beyond the checkpoints (the job key of ``--resume``): each file's hash and weight."""
        return [f"{f.name}:{f.weight}:{f.sha256}" if f.source else f"{f.name}:{f.sha256}" for f in self.files()]

    def record(self) -> dict[str, Any]:
        """The manifest's ``adapters``: every file with its sha256."""
        return {"loras": [f.record() for f in self.loras], "embeddings": [f.record() for f in self.embeddings],
                "vae": self.vae.record() if self.vae is not None else None}

    def png_fields(self, prompts: Iterable[str] = ()) -> dict[str, Optional[str]]:
        """A1111's PNG fields: ``Lora hashes``, ``TI hashes`` (embeddings named in ``prompts``), ``VAE hash`` and
        ``VAE`` (sha256 prefixes: 12 hex digits for LoRA and TI, 10 for the VAE, as A1111 writes them; the PNG
        writer quotes values with separators, ``Lora hashes: "name: 0123456789ab"``)."""
        text = " ".join(prompts)
        used = [e for e in self.embeddings if _names(text, e.name)]
        return {
            "Lora hashes": ", ".join(f"{f.name}: {f.sha256[:12]}" for f in self.loras) if self.loras else None,
            "TI hashes": ", ".join(f"{f.name}: {f.sha256[:12]}" for f in used) if used else None,
            "VAE hash": self.vae.sha256[:10] if self.vae is not None else None,
            "VAE": self.vae.path.name if self.vae is not None else None,
        }


def _names(text: str, word: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


def parse_lora_flag(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); the weight is 1.0 unless the text after the last ``:`` is a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def find_lora(name: str, directory: Optional[str]) -> Path:
    """The LoRA file named ``name`` (its stem) in ``directory`` or its subfolders."""
    where = Path(directory or "models/lora").expanduser()
    if where.is_dir():
        for suffix in LORA_SUFFIXES:
            for p in sorted(where.rglob(f"{name}{suffix}")):
                if p.is_file():
                    return p
    raise SdgenError(f"<lora:{name}>: no LoRA file {name}.safetensors (or .pt / .ckpt) in {where} "
                     "(set the folder with --lora-dir)")


def requested_loras(flags: Sequence[str], prompts: Sequence[tuple[Sequence[str], str]], syntax: str,
                    directory: Optional[str]) -> list[tuple[Path, float, str]]:
    """(file, weight, source) of every LoRA a run asks for: ``--lora`` flags, then the tags of its prompt lines
    (``(texts, where)``: a line's prompt and negative prompt; A1111 syntax only). Raises SdgenError for a bad
    weight, a missing file, a LoRA given twice, or lines that ask for different sets."""
    from ldm.files import require_file

    out: list[tuple[Path, float, str]] = []
    for text in flags:
        path, weight = parse_lora_flag(text)
        out.append((require_file(path, "LoRA file"), weight, "--lora"))
    if syntax == "a1111":
        sets: dict[tuple, str] = {}
        for texts, where in prompts:
            tags = []
            for text in texts:
                try:
                    tags += extract_lora_tags(text)[1]
                except ValueError as exc:
                    raise SdgenError(f"{where}: {exc}" if where else str(exc)) from None
            key = tuple(sorted({(t.name, t.weight) for t in tags}))
            sets.setdefault(key, where)
        tagged = [k for k in sets if k]
        if len(sets) > 1 and tagged:
            a, b = list(sets.items())[:2]
            raise SdgenError(f"the prompts ask for different LoRA sets ({sets[a[0]] or 'one prompt'}: "
                             f"{_describe(a[0])}; {sets[b[0]] or 'another'}: {_describe(b[0])}); LoRAs are merged "
                             "into the weights once per run: run the prompts with different LoRAs separately")
        for name, weight in (tagged[0] if tagged else ()):
            out.append((find_lora(name, directory), weight, "prompt"))
    seen: dict[Path, str] = {}
    for path, _, source in out:
        key = path.resolve()
        if key in seen:
            raise SdgenError(f"the LoRA {path.name} is asked for twice ({seen[key]} and {source}); give it once")
        seen[key] = source
    return out


def _describe(tags: tuple) -> str:
    return ", ".join(f"<lora:{n}:{w:g}>" for n, w in tags) or "none"


def plan_adapters(opts: Any, prompts: Sequence[tuple[Sequence[str], str]], configs: Sequence[Any]) -> Adapters:
    """The checked adapter files of a run (module docstring); ``configs`` are the run's model configs in stage
    order (the LoRAs go into the first). No model weights are read."""
    from ldm.checkpoint import build_model_on_meta
    from ldm.model_files import file_sha256

    loras = requested_loras(opts.lora, prompts, opts.prompt_syntax, opts.lora_dir)
    embedding_files = ti.find_embeddings(opts.embedding, opts.embeddings_dir)
    if not loras and not embedding_files and opts.vae is None:
        return Adapters()
    metas = [build_model_on_meta(config) for config in configs]
    lora_files, layers = [], {}
    targets = lora_targets(metas[0]) if loras else {}
    shapes = {k: tuple(v.shape) for k, v in metas[0].state_dict().items()} if loras else {}
    for path, weight, source in loras:
        found, keys = lora_io.read_lora(path)
        matched = lora_io.match_lora(path, found, keys, targets, shapes)
        sha = file_sha256(path)
        lora_files.append(AdapterFile(path, path.stem, sha, weight, source))
        layers[sha] = matched
        logger.info("LoRA %s (%s layout): %d layers, weight %g", path.name, lora_io.describe_layout(keys),
                    len(matched), weight)
    explicit = {Path(p).expanduser().resolve() for p in opts.embedding}
    kept = []
    for path in embedding_files:
        try:
            embedding = ti.read_embedding(path)
        except SdgenError:
            if path.resolve() in explicit:
                raise
            logger.info("skipping %s in the embeddings folder: not a textual-inversion embedding", path.name)
            continue
        try:
            for meta in metas:
                _check_embedding(meta, embedding)
        except SdgenError:
            if path.resolve() in explicit:
                raise
            logger.info("skipping the embedding %s: made for another model family", path.name)
            continue
        kept.append(AdapterFile(path, embedding.name, file_sha256(path)))
    vae = None
    if opts.vae is not None:
        tensors = read_vae(opts.vae)
        for meta in metas:
            check_vae(opts.vae, tensors, meta.first_stage_model)
        vae = AdapterFile(Path(opts.vae).expanduser(), Path(opts.vae).stem, file_sha256(opts.vae))
    return Adapters(tuple(lora_files), tuple(kept), vae, layers)


def _check_embedding(model: nn.Module, embedding: ti.Embedding) -> None:
    ti.check_fits(model.text_encoders() if hasattr(model, "text_encoders") else [], embedding)


def apply_adapters(model: nn.Module, adapters: Adapters, *, first: bool) -> list[str]:
    """Apply the run's adapters to a loaded ``model`` (LoRAs only into the ``first`` model); returns the trigger
    words registered in its text encoders."""
    if first:
        for f in adapters.loras:
            matched = adapters.lora_layers.get(f.sha256)
            if matched is None:  # a plan rebuilt from a record: read the file again
                found, keys = lora_io.read_lora(f.path)
                shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                matched = lora_io.match_lora(f.path, found, keys, lora_targets(model), shapes)
            lora_io.merge_lora(model, matched, f.weight)
    if adapters.vae is not None:
        replace_vae(model.first_stage_model, read_vae(adapters.vae.path))
    names = []
    for f in adapters.embeddings:
        ti.register(model.text_encoders(), ti.read_embedding(f.path))
        names.append(f.name)
    return names


__all__ = ["Adapters", "AdapterFile", "plan_adapters", "apply_adapters", "parse_lora_flag", "requested_loras",
           "find_lora", "LORA_SUFFIXES"]
