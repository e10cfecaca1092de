"""CLIP tokenization, offline, in the two flavours the released models were trained with.

Both flavours use OpenAI's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``, shipped inside open_clip) and
produce ``[BOS 49406] + tokens + [EOS 49407]`` in a (B, 77) int64 tensor. They differ only in padding:

* **HF style** (SD 1.x, SDXL encoder 0; CV ``ldm/modules/encoders/modules.py::FrozenCLIPEmbedder``):
  transformers' ``CLIPTokenizer`` with ``padding="max_length"``, so the pad id is ``<|endoftext|>`` = 49407.
  The tokenizer needs ``vocab.json`` + ``merges.txt``; they are generated once per process from the BPE file
  (same ids as the hub files of openai/clip-vit-large-patch14), so nothing is downloaded.
* **open_clip style** (SD 2.x ViT-H, SDXL bigG; open_clip ``tokenizer.py``): the result tensor starts as zeros,
  so the pad id is 0 (the "!" token).

A prompt longer than the context keeps its first 75 tokens; position 76 becomes EOS in both flavours. The
dropped words are named in one logging warning per call, since the model silently never sees them.
"""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
OPEN_CLIP_PAD_ID = 0
CONTEXT_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # merges used by CLIP's BPE (open_clip / transformers read the same slice)


def _bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (the first 256 vocabulary entries, in order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The HF ``vocab.json`` mapping and ``merges.txt`` lines (without header) for CLIP's BPE file.

    Vocabulary order as in CLIP: 256 byte symbols, the same with ``</w>``, one entry per merge, then the two
    special tokens (ids 49406, 49407) -> 49408 entries.
    """
    lines = gzip.open(bpe_path or _bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def hf_clip_tokenizer():
    """transformers ``CLIPTokenizer`` equal to openai/clip-vit-large-patch14's, built offline.

    The vocab/merges files only live in a temporary folder while the tokenizer reads them; the result is
    cached for the process.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="sdgen-clip-tok-") as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            unk_token="<|endoftext|>",
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            model_max_length=CONTEXT_LENGTH,
        )
    return tok


@lru_cache(maxsize=1)
def open_clip_tokenizer():
    """open_clip's ``SimpleTokenizer`` (lower-casing clean, as ``open_clip.tokenize`` uses)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _pack(
    token_lists: Sequence[Sequence[int]],
    prompts: Sequence[str],
    max_length: int,
    pad_id: int,
    decode: Callable[[list[int]], str],
) -> torch.Tensor:
    """[BOS] + tokens[:max_length-2] + [EOS], padded with ``pad_id`` -> (B, max_length) int64.

    Truncation keeps the first ``max_length - 2`` tokens and ends with EOS, which is what both transformers
    (``truncation=True``) and open_clip (cut to 77, last set to EOT) produce.
    """
    keep = max_length - 2
    out = torch.full((len(token_lists), max_length), pad_id, dtype=torch.long)
    dropped: dict[str, str] = {}
    for i, toks in enumerate(token_lists):
        toks = list(toks)
        if len(toks) > keep:
            dropped.setdefault(prompts[i], decode(toks[keep:]).strip())
            toks = toks[:keep]
        ids = [BOS_ID, *toks, EOS_ID]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    if dropped:
        parts = "; ".join(repr(text) for text in dropped.values())
        logger.warning(
            "prompt longer than %d tokens (CLIP's limit): %d prompt(s) truncated, the model ignores: %s",
            max_length,
            len(dropped),
            parts,
        )
    return out


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    return [str(p) for p in prompts]


def tokenize_hf(prompts: str | Sequence[str], max_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """HF ``CLIPTokenizer`` ids padded with EOS (49407) -> (B, max_length) int64 (SD 1.x, SDXL CLIP-L)."""
    prompts = _as_list(prompts)
    tok = hf_clip_tokenizer()
    ids = tok(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    return _pack(ids, prompts, max_length, EOS_ID, lambda t: tok.decode(t, skip_special_tokens=True))


def tokenize_open_clip(prompts: str | Sequence[str], max_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """``open_clip.tokenize`` ids padded with 0 -> (B, max_length) int64 (SD 2.x ViT-H, SDXL bigG)."""
    prompts = _as_list(prompts)
    tok = open_clip_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    return _pack(ids, prompts, max_length, OPEN_CLIP_PAD_ID, tok.decode)
