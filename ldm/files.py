"""Checks on the files a user hands to sdgen, before anything reads them for real.

Every reader of a user file (checkpoints, configs, init images, prompt files, CLIP statistics, safety-checker
weights, SLD settings, run manifests) starts with :func:`require_file`, so a missing, unreadable or empty file is
one clear :class:`~ldm.errors.SdgenError` naming the file and its role. :func:`looks_like` names what a file of
the wrong kind seems to be (from its first bytes), so that "the checkpoint x.ckpt is a PNG image" replaces a
deserializer's stack of errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm.errors import SdgenError

PathLike = str | os.PathLike

# first bytes -> what the file is (the usual suspects when the wrong file is passed)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x80", "a Python pickle"),
    (b"%PDF", "a PDF document"),
)


def looks_like(path: PathLike) -> str:
    """A short description of what the file's first bytes say it is ("a PNG image", "a text file", ...)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return "an unreadable file"
    if not head:
        return "an empty file"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if len(head) >= 9 and head[8:9] == b"{":
        return "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file"
    stripped = text.lstrip()
    if "\x00" in text:
        return "a binary file"
    if stripped.startswith(("{", "[")):
        return "a JSON text file"
    return "a text file"


def require_file(path: PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` once it is known to be a readable, non-empty regular file.

    Args:
        what: the file's role in the message ("checkpoint", "init image", "prompt file", ...).

    Raises:
        SdgenError: missing, a folder, unreadable, or empty (0 bytes).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SdgenError(f"{what} not found: {path}")
    if p.is_dir():
        raise SdgenError(f"the {what} {path} is a folder, not a file")
    if not p.is_file():
        raise SdgenError(f"the {what} {path} is not a regular file")
    try:
        size = p.stat().st_size
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise SdgenError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise SdgenError(f"the {what} {path} is empty (0 bytes)")
    return p


def read_text_file(path: PathLike, what: str) -> str:
    """The UTF-8 text of a user file (:func:`require_file` first); a binary file is refused by what it looks like.

    Raises:
        SdgenError: as :func:`require_file`, or the file is not UTF-8 text (or holds NUL bytes).
    """
    p = require_file(path, what)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SdgenError(f"the {what} {path} is not UTF-8 text (it looks like {looks_like(p)})") from exc
    except OSError as exc:
        raise SdgenError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    if "\x00" in text:
        raise SdgenError(f"the {what} {path} is not a text file (it holds NUL bytes; it looks like {looks_like(p)})")
    return text
