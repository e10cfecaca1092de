"""AUTOMATIC1111's prompt syntax: attention weights, BREAK, LoRA tags (as its wiki documents them).

* ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` sets the
  factor, nesting multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets; an unclosed bracket applies to
  the rest of the prompt.
* ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.
* ``<lora:NAME:WEIGHT>`` (and ``<lora:NAME>``, weight 1) names a LoRA to apply; the tag leaves the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_FACTOR = 1.1  # "(" multiplies by this, "[" divides by it
BREAK = "BREAK"

_TOKENS = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
  | \(                      # open round
  | \[                      # open square
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)": the weight of the innermost round bracket, and its end
  | \)                      # close round
  | \]                      # close square
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that ends no weight: plain text
  | \\                      # a lone backslash: plain text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::[^>]*)?>")
# characters that make a prompt use the syntax (no syntax: the original scripts' text, bit for bit)
SYNTAX_CHARS = re.compile(r"[()\[\]\\<]|\bBREAK\b")


@dataclass(frozen=True)
class LoraTag:
    """``<lora:NAME:WEIGHT>`` found in a prompt."""

    name: str
    weight: float


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<lora:...>`` tags, and the tags (weight 1.0 when not given).

    Raises:
        ValueError: a tag's weight is not a number.
    """
    tags = []
    for match in _LORA.finditer(text):
        weight = match.group(2)
        try:
            tags.append(LoraTag(match.group(1).strip(), float(weight) if weight is not None else 1.0))
        except ValueError:
            raise ValueError(f"<lora:{match.group(1)}:{weight}>: the weight must be a number") from None
    return _LORA.sub("", text), tags


def strip_lora_tags(text: str) -> str:
    """The prompt without its ``<lora:...>`` tags (the text the encoder sees)."""
    return _LORA.sub("", text)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as ``[(text, weight), ...]`` with neighbouring runs of one weight merged; ``(BREAK, -1)`` marks
    a BREAK. ``"a (b:1.5) [c]"`` -> ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]``."""
    result: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in result[start:]:
            item[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            result.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(result))
        elif token == "[":
            square_open.append(len(result))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / ROUND_FACTOR)
        else:
            parts = _BREAK.split(token)
            for k, part in enumerate(parts):
                if k > 0:
                    result.append([BREAK, -1.0])
                if part:
                    result.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, 1 / ROUND_FACTOR)
    if not result:
        return [("", 1.0)]
    merged: list[list] = [result[0]]
    for text_, weight_ in result[1:]:
        if weight_ == merged[-1][1] and weight_ != -1.0:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight_])
    return [(t, w) for t, w in merged]


def uses_syntax(text: str) -> bool:
    """Whether a prompt holds anything the syntax reads (brackets, backslashes, tags, BREAK)."""
    return bool(SYNTAX_CHARS.search(text))
