"""Opening checkpoints and loading them into models built from configs.

* :func:`read_state_dict` reads ``.safetensors`` (no pickle at all) and PyTorch ``.ckpt`` / ``.pt`` files. The
  latter are pickles, so they are opened with ``torch.load(weights_only=True)`` plus an explicit allow-list of
  the harmless non-tensor objects real Stable Diffusion checkpoints hold (facts.md section 12): the Lightning
  ``ModelCheckpoint`` callback is rebuilt as an inert stand-in, numpy scalars and dtypes as numpy objects. Any
  other global is refused by name before anything is unpickled.
* :func:`load_model` builds the module tree with every parameter on the ``meta`` device (no memory, no random
  init), converts the file's tensors one by one to the target dtype/device and assigns them
  (``load_state_dict(assign=True)``), so peak memory stays near one copy of the weights. Buffers are computed
  for real while the tree is built (schedules, CLIP ``position_ids``, attention masks), so the ones a file does
  not hold keep their correct values.
* Loading is strict. Keys a released file is known to carry beyond the model (``model_ema.*``, the old CLIP
  ``position_ids`` buffer) are dropped with one logged note; anything else that does not fit raises a
  :class:`~ldm.errors.SdgenError` that counts the problems, names the first keys and guesses which config the
  file needs (:func:`guess_config`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.util import instantiate_from_config

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
    try:
        return load_file(str(path), device="cpu")
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

    ``.safetensors`` files are read without any pickle (memory-mapped by safetensors). Pickle checkpoints
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


# ---- Configs -----------------------------------------------------------------------------------------------------


def load_config(path: PathLike):
    """Load a YAML config as an OmegaConf ``DictConfig``.

    Raises:
        SdgenError: the file is missing, is not valid YAML, or is not a mapping.
    """
    from omegaconf import DictConfig, OmegaConf

    from ldm.files import read_text_file

    p = Path(path).expanduser()
    text = read_text_file(p, "config")
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:  # yaml.YAMLError and OmegaConf errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdgenError(f"invalid config {p}: {first}") from exc
    if not isinstance(cfg, DictConfig):
        raise SdgenError(f"invalid config {p}: expected a mapping at the top level")
    return cfg


def load_model_config(path: PathLike):
    """:func:`load_config` of a model config: one with a ``model.target`` to build (raises SdgenError naming
    the file otherwise)."""
    cfg = load_config(path)
    model = cfg.get("model", None)
    if not hasattr(model, "get") or not isinstance(model.get("target", None), str):
        raise SdgenError(f"the config {path} is not a model config (it has no model.target)")
    return cfg


def _model_section(config: Any):
    """The ``model`` node of a full config (or the config itself when it is already a target/params node)."""
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if hasattr(config, "get") and config.get("model") is not None:
        return config["model"]
    if hasattr(config, "get") and config.get("target") is not None:
        return config
    raise SdgenError("config has neither a 'model' section nor a 'target'")


# ---- Which config does a file need? ------------------------------------------------------------------------------

#: Config paths (relative to the repository root) named in error messages.
CONFIG_SD1 = "configs/stable-diffusion/v1-inference.yaml"
CONFIG_SD2V = "configs/stable-diffusion/v2-inference-v.yaml"
CONFIG_UNCLIP_L = "configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml"
CONFIG_UNCLIP_H = "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml"
CONFIG_SDXL_BASE = "configs/sdxl/sd_xl_base.yaml"
CONFIG_SDXL_REFINER = "configs/sdxl/sd_xl_refiner.yaml"


def bundled_config(relative: str) -> Path:
    """Absolute path of a bundled config named relative to the repository root (e.g. :data:`CONFIG_SD1`)."""
    from ldm.bundled import bundled_path

    return bundled_path(relative)


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return None


def guess_config(state_dict: Mapping[str, Any] | Iterable[str]) -> str | None:
    """Guess which bundled config a checkpoint needs from its keys (and shapes, when given).

    Args:
        state_dict: ``{key: tensor or shape}`` or just the keys.

    Returns:
        A config path relative to the repository root (e.g. ``configs/sdxl/sd_xl_base.yaml``), or None.
        Signatures: ``conditioner.embedders`` -> SDXL (base when a CLIP-L ``transformer`` embedder is present,
        refiner otherwise); ``embedder.*`` / ``noise_augmentor.*`` -> SD 2.1 unCLIP (L or H from the ADM width
        1536 / 2048 or the image tower); ``cond_stage_model.model.*`` -> SD 2.x (768-v);
        ``cond_stage_model.transformer.*`` -> SD 1.x.
    """
    shapes = dict(state_dict) if isinstance(state_dict, Mapping) else {k: None for k in state_dict}
    keys = list(shapes)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):
        return CONFIG_SDXL_BASE if has("conditioner.embedders.0.transformer.") else CONFIG_SDXL_REFINER
    if has("embedder.") or has("noise_augmentor."):
        adm = _shape(shapes.get("model.diffusion_model.label_emb.0.0.weight"))
        if adm is not None and len(adm) == 2:
            return CONFIG_UNCLIP_H if adm[1] == 2048 else CONFIG_UNCLIP_L
        proj = _shape(shapes.get("embedder.model.visual.proj"))
        if proj is not None and len(proj) == 2:
            return CONFIG_UNCLIP_H if proj[1] == 1024 else CONFIG_UNCLIP_L
        # OpenAI CLIP (-L) keeps its text transformer; open_clip (-H) deletes it
        return CONFIG_UNCLIP_L if has("embedder.model.transformer.") else CONFIG_UNCLIP_H
    if has("cond_stage_model.model."):
        return CONFIG_SD2V
    if has("cond_stage_model.transformer."):
        return CONFIG_SD1
    return None


def _layout_hint(keys: Iterable[str]) -> str:
    """A hint for files that are not full original-layout checkpoints at all."""
    keys = list(keys)
    if any(k.startswith(("down_blocks.", "unet.", "text_encoder.", "vae.")) or ".down_blocks." in k for k in keys):
        return "it looks like a diffusers-format file; sdgen reads the original single-file checkpoints"
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return "it looks like a VAE-only file, not a full model checkpoint"
    if keys and all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.",
                                  "label_emb.")) for k in keys):
        return "it looks like a bare UNet state_dict, not a full model checkpoint"
    return ""


# ---- Building on meta and loading --------------------------------------------------------------------------------

# Keys released files carry beyond the model: dropped with one note (tests/data/manifests: expected/possible extras).
KNOWN_EXTRA_KEYS: tuple[tuple[str, str], ...] = (
    (r"^model_ema\.", "training EMA state (model_ema.*)"),
    (r"(^|\.)transformer\.text_model\.embeddings\.position_ids$",
     "CLIP position_ids saved by transformers < 4.31 (recomputed as arange)"),
)

# Persistent buffers computed from the config that a file may lack (they keep the values computed at build):
# the DDPM schedules (top level and the unCLIP noise augmentor) and SDXL's denoiser.sigmas.
_SCHEDULE_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
RECOMPUTABLE_KEYS = re.compile(r"^(noise_augmentor\.)?(" + "|".join(_SCHEDULE_NAMES) + r")$|^denoiser\.sigmas$")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device at once.

    Modules create a parameter, register it and only then initialise it (``reset_parameters``), so the random
    init runs on meta (free) and CPU memory never holds the full weights. Buffers stay real, so everything a
    constructor computes into a buffer (schedules, masks, position ids) keeps its value.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            extra = dict(param.__dict__)
            extra["requires_grad"] = param.requires_grad
            param = type(param)(param.detach().to("meta"), **extra)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_model_on_meta(config: Any) -> nn.Module:
    """Instantiate the model of ``config`` (path, full config or its ``model`` node) with parameters on meta.

    Buffers are computed for real on the CPU. The result has the exact state_dict keys and shapes of the
    model and costs almost no memory; load weights into it with :func:`assign_state_dict`.
    """
    model_cfg = _model_section(config)
    with _parameters_on_meta():
        model = instantiate_from_config(model_cfg)
    if not isinstance(model, nn.Module):
        raise SdgenError(f"config target {model_cfg.get('target')!r} did not build a torch module")
    return model


def _first(items: Iterable[str], n: int = 3) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def _fp32_buffer_names(model: nn.Module) -> set[str]:
    """Buffers kept in float32 whatever the dtype: modules list them in ``keep_fp32_buffers`` (schedules)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        for name in getattr(module, "keep_fp32_buffers", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


@dataclass
class KeyReport:
    """How a file's keys compare with a model's state_dict (see :func:`classify_keys`)."""

    dropped: list[str] = field(default_factory=list)  # known extras, ignored
    recomputed: list[str] = field(default_factory=list)  # schedule buffers absent from the file
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)  # "key (file [..], model [..])"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)


def classify_keys(expected: Mapping[str, torch.Tensor], file_shapes: Mapping[str, Any]) -> KeyReport:
    """Compare a model's ``state_dict(keep_vars=True)`` with a file's ``{key: tensor or shape}``.

    Works with meta tensors on both sides, so a released file's key manifest can be checked without weights.
    """
    shapes = {k: _shape(v) for k, v in file_shapes.items()}
    report = KeyReport()
    for key in shapes:
        if key in expected:
            continue
        if any(re.search(p, key) for p, _ in KNOWN_EXTRA_KEYS):
            report.dropped.append(key)
        else:
            report.unexpected.append(key)
    for key, target in expected.items():
        if key not in shapes:
            if RECOMPUTABLE_KEYS.search(key) and not target.is_meta:
                report.recomputed.append(key)
            else:
                report.missing.append(key)
        elif shapes[key] != tuple(target.shape):
            report.wrong_shape.append(f"{key} (file {list(shapes[key])}, model {list(target.shape)})")
    return report


def _mismatch_error(
    source: str, config_name: str | None, report: KeyReport, file_shapes: Mapping[str, Any]
) -> SdgenError:
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing keys ({_first(report.missing)})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected keys ({_first(report.unexpected)})")
    if report.wrong_shape:
        parts.append(f"{len(report.wrong_shape)} shape mismatches ({_first(report.wrong_shape)})")
    where = f" with config {config_name}" if config_name else ""
    msg = f"checkpoint {source} does not fit the model{where}: " + "; ".join(parts)
    guess = guess_config(file_shapes)
    hint = _layout_hint(file_shapes)
    if guess and (config_name is None or not str(config_name).endswith(guess)):
        msg += f"; the file looks like it needs {guess}"
    elif hint:
        msg += f"; {hint}"
    elif guess is None:
        msg += "; no bundled config matches its keys"
    return SdgenError(msg)


def assign_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "state_dict",
    config_name: str | None = None,
) -> nn.Module:
    """Strictly load ``state_dict`` into a model from :func:`build_model_on_meta`, assigning the tensors.

    Floating tensors are converted to ``dtype`` (float32 when None) except buffers listed in a module's
    ``keep_fp32_buffers``; integer buffers keep the model's dtype. Entries are popped from ``state_dict`` while
    converting, so the caller's dict is consumed and memory holds about one copy. Known extras are dropped with
    a note; recomputable schedule buffers the file lacks keep their computed values (a note too).

    Raises:
        SdgenError: missing keys, unknown extra keys or shape mismatches (counted, first keys named, with a
            guess of the config the file needs), or tensors left on the meta device.
    """
    dtype = dtype or torch.float32
    device = torch.device(device)
    expected = model.state_dict(keep_vars=True)
    file_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    report = classify_keys(expected, file_shapes)
    if not report.ok:
        raise _mismatch_error(source, config_name, report, file_shapes)
    if report.dropped:
        reasons = sorted({why for p, why in KNOWN_EXTRA_KEYS for k in report.dropped if re.search(p, k)})
        logger.info("%s: dropped %d known extra keys: %s", source, len(report.dropped), "; ".join(reasons))
    if report.recomputed:
        logger.info("%s: %d schedule buffers not in the file, computed from the config (%s)",
                    source, len(report.recomputed), _first(report.recomputed))

    keep_fp32 = _fp32_buffer_names(model)
    ready: dict[str, torch.Tensor] = {}
    shared: list[str] = []  # tensors used as read (for a memory-mapped file: still views of the file)
    for key in list(expected):
        target = expected[key]
        tensor = state_dict.pop(key) if key in state_dict else target.detach()
        want = (torch.float32 if key in keep_fp32 else dtype) if target.is_floating_point() else target.dtype
        ready[key] = tensor.to(device=device, dtype=want)
        if ready[key] is tensor:
            shared.append(key)
        del tensor
    for key in report.dropped:
        state_dict.pop(key, None)
    if len(shared) < len(ready):
        # Most of the file was converted or copied: give the few tensors used as read their own memory too, so
        # they do not keep the whole memory-mapped file resident. (When nothing needed converting, the model
        # keeps using the mapped file: no copy at all.)
        for key in shared:
            ready[key] = ready[key].clone()
    model.load_state_dict(ready, strict=True, assign=True)
    del ready
    _finish(model, device, dtype, keep_fp32)
    return model


def _finish(model: nn.Module, device: torch.device, dtype: torch.dtype, keep_fp32: set[str]) -> None:
    """Materialise leftovers, move non-persistent buffers, freeze, and check nothing stayed on meta."""
    for module in model.modules():
        hook = getattr(module, "materialize_buffers", None)
        if callable(hook) and any(b.is_meta for b in module.buffers(recurse=False)):
            hook()
    for prefix, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.is_meta:
                continue
            full = f"{prefix}.{name}" if prefix else name
            want = (torch.float32 if full in keep_fp32 else dtype) if buf.is_floating_point() else buf.dtype
            if buf.device != device or buf.dtype != want:
                module._buffers[name] = buf.to(device=device, dtype=want)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SdgenError(f"{len(left)} tensors were left on the meta device after loading ({_first(left)})")
    model.eval()
    model.requires_grad_(False)


def load_model(
    config: Any,
    ckpt_path: PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model of ``config`` and load the checkpoint at ``ckpt_path`` into it (strict, see module doc).

    Args:
        config: a config path, a loaded config, or its ``model`` node.
        ckpt_path: ``.safetensors`` or ``.ckpt`` file (fp16, bf16 or fp32).
        device: where the weights go (they are moved tensor by tensor).
        dtype: floating dtype of the weights; None means float32. Schedule buffers stay float32.

    Returns:
        The model in eval mode with gradients disabled.
    """
    config_name = str(config) if isinstance(config, (str, os.PathLike)) else None
    model = build_model_on_meta(config)
    state_dict = read_state_dict(ckpt_path)
    logger.info("loading %s (%d tensors)", ckpt_path, len(state_dict))
    return assign_state_dict(
        model, state_dict, device=device, dtype=dtype, source=str(ckpt_path), config_name=config_name
    )


# ---- File hashes (AUTOMATIC1111 "Model hash") --------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SDGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdgen``, else ``~/.cache/sdgen``."""
    if os.environ.get("SDGEN_CACHE_DIR"):
        return Path(os.environ["SDGEN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sdgen"


def file_sha256(path: PathLike, cache_dir: PathLike | None = None) -> str:
    """Full sha256 hex digest of a file, cached in ``cache_dir/hashes.json`` by path, size and mtime.

    Hashing a multi-GB checkpoint takes seconds, so the digest is remembered; a file that changed (size or
    modification time) is hashed again. An unwritable cache only costs the re-hash.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise SdgenError(f"cannot hash {p}: not a file")
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_file / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, cache_file)
    except OSError as exc:
        logger.debug("could not write the hash cache %s: %s", cache_file, exc)
    return digest


def model_hash(path: PathLike, cache_dir: PathLike | None = None) -> str:
    """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's sha256 (facts.md section 13)."""
    return file_sha256(path, cache_dir)[:10]
