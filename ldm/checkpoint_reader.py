"""Reading checkpoint files: ``.safetensors`` (no pickle at all) and PyTorch ``.ckpt`` / ``.pt`` pickles.

Pickles are opened with ``torch.load(weights_only=True)`` plus an explicit allow-list of the harmless non-tensor
objects real Stable Diffusion checkpoints hold (facts.md section 12): the Lightning ``ModelCheckpoint`` callback is
rebuilt as an inert stand-in, numpy scalars and dtypes as numpy objects. Any other global is refused by name before
anything is unpickled. Every file is checked first (:func:`check_checkpoint_file`): an empty, truncated or
wrong-kind file is one :class:`~ldm.errors.SdgenError` naming it.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")

# ---- Reading files -----------------------------------------------------------------------------------------------


class InertObject:
    """Stand-in for an allow-listed class from a checkpoint pickle; none of the original class's code runs.

    Created by the unpickler in place of e.g. Lightning's ``ModelCheckpoint``: it only records the constructor
    arguments and the pickled state (plain data), readable as ``.args``, ``.kwargs`` and ``.state``.
    """

    original_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.original_name}>"


def _inert_class(full_name: str) -> type:
    """A fresh :class:`InertObject` subclass standing in for ``full_name`` (hashable, usable as a dict key)."""
    return type(
        full_name.rsplit(".", 1)[-1], (InertObject,), {"original_name": full_name, "__module__": "ldm.checkpoint"}
    )


# Objects other than tensors found in real SD .ckpt files (facts.md section 12; AUTOMATIC1111's restricted
# unpickler allows the same set). Lightning 1.x pickles its ModelCheckpoint callback (the class as a key of
# 'callbacks', or an instance whose state holds an fsspec LocalFileSystem): those become inert stand-ins.
_INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "fsspec.spec.make_instance",
    "fsspec.implementations.local.LocalFileSystem",
)


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy scalar/array/dtype reconstruction under both numpy 1.x (``numpy.core``) and 2.x (``numpy._core``)."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[tuple[Any, str]] = []
    for pkg in ("numpy.core", "numpy._core"):
        out.append((multiarray.scalar, f"{pkg}.multiarray.scalar"))
        out.append((multiarray._reconstruct, f"{pkg}.multiarray._reconstruct"))
    out += [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    # The unpickler's BUILD step checks the *type* of a rebuilt dtype (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else ():
        obj = getattr(dtypes, name)
        if isinstance(obj, type) and name.endswith("DType"):
            out.append((obj, f"numpy.dtypes.{name}"))
    return out


def allowed_checkpoint_globals() -> dict[str, Any]:
    """The allow-list: global name -> the object the unpickler may use for it (stand-ins included)."""
    allowed: dict[str, Any] = {name: _inert_class(name) for name in _INERT_GLOBALS}
    for obj, name in _numpy_globals():
        allowed[name] = obj
    return allowed


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` is a safetensors file: by its suffix, else by its header (an 8-byte little-endian
    header length followed by the JSON header's ``{``). Reads at most 9 bytes."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # 8-byte little-endian header length, then the JSON header starting with '{'
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)


def safetensors_header(path: PathLike, what: str = "checkpoint") -> dict[str, Any]:
    """The JSON header of a safetensors file (``{key: {"dtype", "shape", "data_offsets"}, "__metadata__"?}``),
    after checking that the file holds every byte the header promises.

    Raises:
        SdgenError: not a safetensors file, or truncated (the message says how many bytes are missing).
    """
    from ldm.files import looks_like, require_file

    p = require_file(path, what)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > min(size - 8, 1 << 30):
            if 8 <= length < (1 << 30) and looks_like(p) == "a safetensors file":
                raise SdgenError(f"the {what} {path} is truncated: its header needs {length + 8} bytes, the file "
                                 f"has {size}")
            raise SdgenError(f"the {what} {path} is not a safetensors file (it looks like {looks_like(p)})")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise SdgenError(f"the {what} {path} has a damaged safetensors header ({exc})") from exc
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise SdgenError(f"the {what} {path} is truncated: its tensors need {needed} bytes, the file has {size}")
    return header


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path, what)
    # pread (safetensors >= 0.6): tensors in their own memory, no file mapping; a load that converts dtypes then
    # holds the converted weights only (2x a float16 file for float32 weights), where mapped pages would add
    # the file on top (3x; measured on a 2 GB file). Same-dtype loads are 1.0x either way.
    kwargs = {"backend": "pread"} if "backend" in inspect.signature(load_file).parameters else {}
    try:
        return load_file(str(path), device="cpu", **kwargs)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SdgenError(f"cannot read the {what} {path} as safetensors: {exc}") from exc


def read_pickle_checkpoint(path: PathLike, what: str = "checkpoint") -> Any:
    """The whole object of a pickle checkpoint, via ``torch.load(weights_only=True)`` and the allow-list.

    Allow-listed classes come back as :class:`InertObject` stand-ins. Any other global is refused by name
    (:class:`~ldm.errors.SdgenError`) before unpickling starts, for zip-format files. ``what`` names the file's
    role in error messages. A file that is neither a zip archive nor a pickle, or a truncated one, is refused
    with what it looks like.
    """
    path = check_checkpoint_file(path, what)
    allowed = allowed_checkpoint_globals()
    zipped = _is_zip(path)
    if zipped:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # corrupt archive, missing data.pkl, ...
            raise SdgenError(f"cannot read the {what} {path} as a PyTorch checkpoint: "
                             f"{_first_line(exc)}") from exc
        refused = sorted(name for name in needed if name not in allowed)
        if refused:
            raise SdgenError(_refusal(path, refused))
    safe = [(obj, name) for name, obj in allowed.items()]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))  # legacy (non-zip) files are checked while unpickling
        if match:
            raise SdgenError(_refusal(path, [match.group(1)])) from exc
        if isinstance(exc, (EOFError, RuntimeError)) or "truncated" in str(exc) or "Ran out of input" in str(exc):
            raise SdgenError(f"the {what} {path} is truncated or damaged ({_first_line(exc)})") from exc
        raise SdgenError(f"cannot read the {what} {path} as a PyTorch checkpoint: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _refusal(path: Path, names: list[str]) -> str:
    return (
        f"refusing to load {path}: its pickle references {', '.join(names)}, not on the allow-list of harmless "
        "checkpoint contents (unpickling it could run code); convert the file to .safetensors with a "
        "tool you trust, or re-save only its state_dict"
    )


def check_checkpoint_file(path: PathLike, what: str = "checkpoint") -> Path:
    """The cheap checks of a checkpoint before a run commits to it (no tensor is read): a non-empty file that is
    a complete safetensors file (its header and the byte count it promises), a zip archive with its central
    directory (PyTorch's format), or a legacy pickle. Raises SdgenError naming the file otherwise."""
    from ldm.files import looks_like, require_file

    p = require_file(path, what)
    if is_safetensors(p):
        safetensors_header(p, what)
        return p
    kind = looks_like(p)
    if _is_zip(p):
        return p
    if kind == "a zip archive":
        raise SdgenError(f"the {what} {path} is a truncated or damaged zip archive (no central directory)")
    if kind != "a Python pickle":
        raise SdgenError(f"the {what} {path} is not a PyTorch checkpoint (it looks like {kind})")
    return p


def read_state_dict(path: PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: ``{key: tensor}`` on the CPU, in the file's dtypes (fp16/bf16/fp32).

    ``.safetensors`` files are read without any pickle (with its pread backend where it has one). Pickle checkpoints
    (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) go through ``torch.load(weights_only=True, mmap=True)`` with the
    allow-list above; a Lightning-style ``{'state_dict': ..., 'epoch': ..., ...}`` wrapper is unwrapped.
    Non-tensor entries inside the state_dict are dropped with a logged note.

    ``what`` names the file's role in error messages ("checkpoint", "safety-checker weights", ...).

    Raises:
        SdgenError: missing, empty, truncated or unreadable file, a file of another kind, a pickle referencing a
            non-allow-listed global, or no tensors.
    """
    from ldm.files import require_file

    p = require_file(path, what)
    if is_safetensors(p):
        return _read_safetensors(p, what)
    obj = read_pickle_checkpoint(p, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SdgenError(f"the {what} {p} holds a {type(obj).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        logger.info("%s: ignoring %d non-tensor entries (%s)", p.name, len(others), ", ".join(others[:3]))
    if not tensors:
        raise SdgenError(f"the {what} {p} holds no tensors")
    return tensors
