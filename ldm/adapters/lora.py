"""LoRA (Hu et al. 2021) files merged into a model's weights once, before sampling: no cost per step.

For each layer the file holds a down matrix A (rank x in, or rank x in x kh x kw for a LoCon convolution) and an
up matrix B (out x rank [x 1 x 1]), and optionally ``alpha``; the merged weight is
``W + weight * (alpha / rank) * B @ A`` (alpha defaults to the rank). Key layouts (:mod:`ldm.adapters.lora_keys`):

* kohya / A1111: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``;
* peft / diffusers: ``<name>.lora_A.weight``, ``<name>.lora_B.weight`` (``.lora_A.default.weight`` too),
  ``<name>.alpha`` (the diffusers ``network_alphas``), a ``lora_alpha`` in the safetensors metadata or in an
  ``adapter_config.json`` beside the file; the older diffusers ``<name>.lora.down.weight`` /
  ``.processor.to_q_lora.down.weight`` forms.

A file that names layers the model does not have (another family's LoRA, or another format) is refused with the
number of keys that matched nothing and the first of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ldm.adapters.lora_keys import Target
from ldm.errors import SdgenError
from ldm.modules.packed_conv import unpack_convolutions

_SUFFIXES = (  # (regex for the end of a key, role)
    (r"\.lora_down\.weight$", "down"), (r"\.lora_up\.weight$", "up"),
    (r"\.lora_A(\.default)?\.weight$", "down"), (r"\.lora_B(\.default)?\.weight$", "up"),
    (r"\.lora\.down\.weight$", "down"), (r"\.lora\.up\.weight$", "up"),
    (r"_lora\.down\.weight$", "down"), (r"_lora\.up\.weight$", "up"),
    (r"\.alpha$", "alpha"), (r"\.lora_alpha$", "alpha"),
)
_UNSUPPORTED = re.compile(r"\.(lora_mid|hada_w1_a|hada_w1_b|hada_w2_a|lokr_w1|dora_scale|oft_blocks)")


@dataclass
class LoraLayer:
    """One layer of a LoRA file: up (out, r[, 1, 1]), down (r, in[, kh, kw]) and alpha (None: the rank)."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """``(alpha / rank) * up @ down``, float32, shaped (out, in[, kh, kw])."""
        up, down = self.up.float(), self.down.float()
        scale = (self.alpha if self.alpha is not None else self.rank) / self.rank
        product = up.flatten(1) @ down.flatten(1)
        return (scale * product).reshape(up.shape[0], *down.shape[1:])


def layer_name(key: str) -> tuple[str, str]:
    """(layer name, role) of a file key: ``lora_unet_x.lora_down.weight`` -> (``lora_unet_x``, "down")."""
    for pattern, role in _SUFFIXES:
        match = re.search(pattern, key)
        if match:
            name = key[: match.start()]
            name = name.replace(".processor.", ".").replace("base_model.model.", "")
            name = re.sub(r"\.to_out$", ".to_out.0", name)
            return name, role
    return key, ""


def read_lora(path: Path) -> tuple[dict[str, LoraLayer], list[str]]:
    """The layers of a LoRA file and its keys (``.safetensors``, or ``.pt`` / ``.ckpt`` through the safe reader)."""
    from ldm.checkpoint_reader import is_safetensors, read_state_dict

    tensors = read_state_dict(path, "LoRA file")
    metadata_alpha = None
    config = path.parent / "adapter_config.json"
    if is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        for key in ("lora_alpha", "ss_network_alpha"):
            if key in metadata:
                try:
                    metadata_alpha = float(metadata[key])
                except ValueError:
                    pass
                break
    if metadata_alpha is None and config.is_file():
        try:
            metadata_alpha = float(json.loads(config.read_text()).get("lora_alpha"))
        except (ValueError, TypeError):
            metadata_alpha = None
    unsupported = [k for k in tensors if _UNSUPPORTED.search(k)]
    if unsupported:
        raise SdgenError(f"the LoRA file {path} is a LyCORIS variant sdgen does not merge (key {unsupported[0]}); "
                         "sdgen reads plain LoRA and LoCon")
    layers: dict[str, LoraLayer] = {}
    for key, value in tensors.items():
        name, role = layer_name(key)
        if not role:
            continue
        layer = layers.setdefault(name, LoraLayer())
        if role == "alpha":
            layer.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(layer, role, value)
    for name, layer in layers.items():
        if layer.down is None or layer.up is None:
            raise SdgenError(f"the LoRA file {path}: layer {name} lacks its "
                             f"{'down (A)' if layer.down is None else 'up (B)'} matrix")
        if layer.alpha is None and metadata_alpha is not None:
            layer.alpha = metadata_alpha
    if not layers:
        raise SdgenError(f"the LoRA file {path} holds no LoRA layers (no lora_down / lora_A keys)")
    return layers, list(tensors)


def _family_hint(names: list[str]) -> str:
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in names):
        return "; it looks like an SDXL LoRA"
    if any(n.startswith(("lora_te_", "text_encoder.")) for n in names):
        return "; it looks like an SD 1.x / 2.x LoRA"
    return ""


def match_lora(path: Path, layers: Mapping[str, LoraLayer], keys: list[str], targets: Mapping[str, Target],
               shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[Target, LoraLayer]]:
    """Each layer of the file with the weight it changes; raises SdgenError for layers the model lacks or whose
    shapes do not fit (how many keys, and the first)."""
    matched, missing, wrong = [], [], []
    for name, layer in layers.items():
        target = targets.get(name)
        if target is None:
            missing.append(name)
            continue
        full = shapes[target.key]
        rows = (target.rows[1] - target.rows[0]) if target.rows else full[0]
        want = (rows, *full[1:])
        delta = (int(layer.up.shape[0]), int(layer.down.numel() // layer.down.shape[0]))
        if delta[0] != want[0] or delta[1] != int(torch.Size(want[1:]).numel()) or layer.up.shape[1] != layer.rank:
            wrong.append(f"{name} ({list(layer.up.shape)} x {list(layer.down.shape)} for {list(want)})")
            continue
        matched.append((target, layer))
    if missing:
        unmatched = [k for k in keys if layer_name(k)[0] in set(missing)]
        raise SdgenError(f"the LoRA file {path.name} does not fit this model: {len(unmatched)} of {len(keys)} keys "
                         f"match no layer (first: {unmatched[0]}){_family_hint(missing)}")
    if wrong:
        raise SdgenError(f"the LoRA file {path.name} does not fit this model: {len(wrong)} layers have other "
                         f"shapes (first: {wrong[0]}){_family_hint(list(layers))}")
    return matched


@torch.no_grad()
def merge_lora(model: nn.Module, matched: list[tuple[Target, LoraLayer]], weight: float) -> None:
    """``W += weight * (alpha / rank) * B @ A`` for each matched layer, in float32, into the model's weights."""
    unpack_convolutions(model)  # a convolution that already ran holds its weight packed
    params = dict(model.named_parameters())
    for target, layer in matched:
        param = params[target.key]
        delta = layer.delta().to(param.device)
        if target.rows is not None:
            a, b = target.rows
            rows = param.data[a:b]
            param.data[a:b] = (rows.float() + weight * delta.reshape(rows.shape)).to(param.dtype)
        else:
            param.data.copy_((param.data.float() + weight * delta.reshape(param.shape)).to(param.dtype))


def lora_forward(x: torch.Tensor, layer: LoraLayer, weight: float) -> torch.Tensor:
    """The unmerged low-rank branch of a linear layer: ``weight * (alpha / rank) * B (A x)`` (for tests and
    checks of the merge)."""
    scale = (layer.alpha if layer.alpha is not None else layer.rank) / layer.rank
    return weight * scale * (x @ layer.down.float().T @ layer.up.float().T)


def describe_layout(keys: list[str]) -> str:
    """"kohya" or "peft" (for the manifest)."""
    return "kohya" if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys) else "peft"


__all__ = ["LoraLayer", "read_lora", "match_lora", "merge_lora", "lora_forward", "layer_name", "describe_layout"]
