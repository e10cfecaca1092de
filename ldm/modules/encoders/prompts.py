"""Prompts as AUTOMATIC1111 encodes them: weighted tokens in 75-token chunks, textual-inversion vectors, clip skip.

Two modes (``TextOptions.syntax``):

* ``"original"``: the research scripts' conditioning: the text as written (brackets are words), cut at 77 tokens.
* ``"a1111"`` (default): the prompt syntax (:mod:`ldm.modules.encoders.prompt_syntax`) and long prompts. The
  tokens are packed into chunks of 75 (a chunk that would split within 20 tokens after a comma breaks after the
  comma instead; ``BREAK`` ends a chunk; an embedding's vectors never straddle two chunks); each chunk is encoded
  as its own ``[BOS] + 75 tokens + [EOS]`` context and the chunks are concatenated along the sequence axis. The
  encoder output of each token is multiplied by its weight and the chunk rescaled so its mean is unchanged
  (A1111 ``process_tokens``; here per prompt, so an image does not depend on its batch). A prompt of at most
  75 tokens without syntax characters gives exactly the tokens, and so the images, of the original mode.

An encoder takes part through a small interface: ``id_start`` / ``id_end`` / ``id_pad``, ``word_ids(text)``,
``embedding_ids(name)`` (the token ids of a registered textual-inversion embedding) and ``encode_ids(ids,
clip_skip)`` -> ``(z (N, 77, D), pooled (N, E) or None)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ldm.modules.encoders.prompt_syntax import BREAK, parse_prompt_attention, strip_lora_tags, uses_syntax

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
SYNTAXES = ("a1111", "original")


@dataclass(frozen=True)
class TextOptions:
    """How prompts become conditioning: the syntax mode, A1111's clip skip (1 = the encoder's own output layer,
    2 = one layer earlier, ...) and the textual-inversion trigger words registered in the encoders."""

    syntax: str = "a1111"
    clip_skip: int = 1
    embeddings: tuple[str, ...] = field(default=())


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _pieces(text: str, names: Sequence[str]) -> list[tuple[str, bool]]:
    """``text`` split at whole-word occurrences of the embedding ``names``: ``[(piece, is_embedding), ...]``."""
    if not names:
        return [(text, False)]
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
                         + r")(?![\w-])")
    out, last = [], 0
    for match in pattern.finditer(text):
        if match.start() > last:
            out.append((text[last:match.start()], False))
        out.append((match.group(1), True))
        last = match.end()
    if last < len(text):
        out.append((text[last:], False))
    return out


def chunk_prompt(encoder: Any, text: str, options: TextOptions) -> list[Chunk]:
    """The chunks of one prompt (A1111 ``tokenize_line``): each ``[BOS] + 75 tokens + [EOS]`` with its weights."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1
    comma = encoder.word_ids(",")[0]

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        pad = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens += [encoder.id_end] * pad
        chunk.weights += [1.0] * pad
        chunk.tokens = [encoder.id_start] + chunk.tokens + [encoder.id_end]
        chunk.weights = [1.0] + chunk.weights + [1.0]
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment, weight in parse_prompt_attention(strip_lora_tags(text)):
        if fragment == BREAK and weight == -1:
            next_chunk()
            continue
        for piece, is_embedding in _pieces(fragment, options.embeddings):
            if is_embedding:
                ids = list(encoder.embedding_ids(piece))
                if len(chunk.tokens) + len(ids) > CHUNK_LENGTH:
                    next_chunk()
                chunk.tokens += ids
                chunk.weights += [weight] * len(ids)
                continue
            for token in encoder.word_ids(piece):
                if token == comma:
                    last_comma = len(chunk.tokens)
                elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                    cut = last_comma + 1
                    moved, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                    chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                    next_chunk()
                    chunk.tokens, chunk.weights = moved, moved_weights
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        next_chunk()
    return chunks


def empty_chunk(encoder: Any) -> Chunk:
    """The padding chunk of a prompt shorter than its batch-mates (A1111: BOS, then EOS)."""
    return Chunk([encoder.id_start] + [encoder.id_end] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def _ids(encoder: Any, tokens: list[int]) -> list[int]:
    """Open_clip style pads with ``id_pad`` after the first EOS (A1111 ``process_tokens``)."""
    if encoder.id_pad == encoder.id_end:
        return tokens
    end = tokens.index(encoder.id_end)
    return tokens[: end + 1] + [encoder.id_pad] * (len(tokens) - end - 1)


def prompt_chunks(encoder: Any, texts: Sequence[str], options: TextOptions) -> list[list[Chunk]]:
    """The chunks of every prompt (the original mode: one chunk, the text cut at 77 tokens)."""
    if options.syntax == "original":
        ids = encoder.tokenize(list(texts))
        return [[Chunk(row.tolist(), [1.0] * ids.shape[1])] for row in ids]
    return [chunk_prompt(encoder, text, options) for text in texts]


def count_chunks(encoder: Any, texts: Sequence[str], options: Optional[TextOptions]) -> int:
    """How many chunks the longest of ``texts`` needs (1 in the original mode)."""
    if options is None or options.syntax == "original":
        return 1
    return max(len(c) for c in prompt_chunks(encoder, texts, options))


def encode_prompts(encoder: Any, texts: Sequence[str], options: Optional[TextOptions],
                   min_chunks: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompts -> (conditioning (N, 77 k, D), pooled (N, E) of the first chunk or None), all prompts padded to
    ``k = max(min_chunks, chunks of the longest prompt)`` chunks."""
    options = options or TextOptions(syntax="original")
    plain = options.syntax == "original" or not any(uses_syntax(t) for t in texts)
    per_prompt = prompt_chunks(encoder, texts, options)
    count = max([min_chunks] + [len(c) for c in per_prompt])
    for chunks in per_prompt:
        chunks += [empty_chunk(encoder)] * (count - len(chunks))
    device = encoder.device
    outputs, pooled = [], None
    for k in range(count):
        ids = torch.tensor([_ids(encoder, chunks[k].tokens) for chunks in per_prompt], dtype=torch.long, device=device)
        z, pool = encoder.encode_ids(ids, options.clip_skip)
        weights = torch.tensor([chunks[k].weights for chunks in per_prompt], dtype=z.dtype, device=z.device)
        if not plain or bool((weights != 1).any()):
            original_mean = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[:, :, None]
            z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
        outputs.append(z)
        pooled = pool if k == 0 else pooled
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], pooled
