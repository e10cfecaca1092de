"""Loading checkpoints into models built from configs.

* :func:`read_state_dict` (:mod:`ldm.checkpoint_reader`) reads ``.safetensors`` and PyTorch ``.ckpt`` files
  without running pickled code.
* :func:`load_model` builds the module tree with every parameter on the ``meta`` device (no memory, no random
  init), converts the file's tensors one by one to the target dtype/device and assigns them
  (``load_state_dict(assign=True)``), so peak memory stays near one copy of the weights. Buffers are computed
  for real while the tree is built (schedules, CLIP ``position_ids``, attention masks), so the ones a file does
  not hold keep their correct values.
* Loading is strict. Keys a released file is known to carry beyond the model (``model_ema.*``, the old CLIP
  ``position_ids`` buffer) are dropped with one logged note; anything else that does not fit raises a
  :class:`~ldm.errors.SdgenError` that counts the problems, names the first keys and guesses which config the
  file needs (:func:`ldm.model_id.identify`).
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ldm.checkpoint_reader import read_state_dict
from ldm.errors import SdgenError
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

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


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
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
    from ldm.model_id import identify

    guess = identify(file_shapes).config
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
