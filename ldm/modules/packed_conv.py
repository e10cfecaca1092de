"""Convolutions with weights packed once for the CPU's oneDNN kernels.

An eager ``F.conv2d`` on the CPU hands oneDNN a plain weight (OIHW) that is reordered into the kernel's blocked
layout on every call (and, for contiguous float32 activations, the activations too): about 40 % of a float32
UNet step on a 2-core CPU is spent in those copies. :class:`PackedConv2d` reorders the weight once, on its first
call (for the shape and dtype of that call), and then calls the packed kernel
(``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile`` uses with weight freezing). The dense
weight is released when the packed one has the same dtype, so packing costs no memory.

Numerics: the same oneDNN convolution. bf16 results are identical to eager; float32 results agree to about 1e-5
relative (the packed kernel blocks the reduction differently; tests/test_inference.py bounds it).

Packing happens on the first call, after checkpoint loading and LoRA merges. A later change of the weight is
noticed (the ``weight`` Parameter replaced, or given back its full shape) and the weight repacked; to edit a
packed weight in place, call :meth:`PackedConv2d.unpack` first. ``state_dict()`` returns the dense weight.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn


def packing_available() -> bool:
    """Whether this PyTorch build has the oneDNN packed convolution kernel."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def bf16_packing_available() -> bool:
    """Whether oneDNN packs bfloat16 weights on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT;
    on an AVX2-only CPU a bf16 reorder raises, so bf16 convolutions there stay eager."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return packing_available() and check is not None and bool(check())


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs on CPU with a packed weight (see the module docstring); any other call (CUDA,
    padding modes other than zeros, float16, bfloat16 on a CPU without oneDNN's bf16 path, ...) is the eager
    convolution."""

    _packed: Optional[torch.Tensor] = None
    _packed_from: Any = None  # weak reference to the Parameter object the packed weight was made from
    _packed_version: int = -1  # and its version counter then (in-place edits bump it)

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> "PackedConv2d":
        """Turn ``conv`` into a PackedConv2d in place (its class changes; parameters and hooks stay)."""
        if not isinstance(conv, cls):
            conv.__class__ = cls
            conv._register_state_dict_hook(_dense_weight_in_state_dict)
        return conv

    # ---- packing

    def _compute_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype this call computes in (autocast's when enabled, else the weight's), or None when the call
        must be the eager convolution."""
        if x.device.type != "cpu" or self.padding_mode != "zeros" or not isinstance(self.padding, tuple):
            return None
        dtype = self.weight.dtype
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        elif x.dtype != dtype:
            return None  # eager raises its dtype error
        if dtype == torch.bfloat16:
            return dtype if bf16_packing_available() else None
        return dtype if dtype == torch.float32 else None

    def _is_packed_for(self, dtype: torch.dtype) -> bool:
        return (self._packed is not None and self._packed.dtype == dtype and self._packed_from is not None
                and self._packed_from() is self.weight and self.weight._version == self._packed_version
                and (self.weight.numel() == 0 or self.weight.dtype != dtype))

    def _dense(self) -> torch.Tensor:
        """The plain (O, I, kH, kW) weight: the parameter, or unpacked when it was released."""
        if self.weight.numel() == 0 and self._packed is not None:  # on the weight's device (after a .to())
            return self._packed.to_dense().to(device=self.weight.device, dtype=self.weight.dtype)
        return self.weight.detach()

    def _pack(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        self.unpack()  # a released weight comes back first: packing in another dtype keeps the dense one
        dense = self.weight.detach().to(dtype).contiguous()
        self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            dense.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
            list(x.shape))
        self._packed_from = weakref.ref(self.weight)
        if dtype == self.weight.dtype:  # the packed weight holds the same numbers: release the dense copy
            self.weight.data = self.weight.data.new_empty(0)
        self._packed_version = self.weight._version

    def unpack(self) -> None:
        """Give the ``weight`` Parameter back its dense values (to edit them in place) and drop the packed one."""
        if self._packed is not None and self.weight.numel() == 0:
            self.weight.data = self._dense()
        self._packed = None
        self._packed_from = None

    # ---- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        if dtype is None:
            if self.weight.numel() == 0:
                self.unpack()
            return super().forward(x)
        if not self._is_packed_for(dtype):
            self._pack(x, dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), self._packed, bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")


def _dense_weight_in_state_dict(module: PackedConv2d, state: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + "weight"
    if key in state and state[key].numel() == 0 and module._packed is not None:
        state[key] = module._dense()


def pack_convolutions(module: nn.Module) -> int:
    """Make every ``nn.Conv2d`` under ``module`` a :class:`PackedConv2d` (packed on its first CPU call); returns
    how many. Nothing changes where the kernel is missing."""
    if not packing_available():
        return 0
    count = 0
    for child in module.modules():
        if type(child) is nn.Conv2d:
            PackedConv2d.convert(child)
            count += 1
    return count


def unpack_convolutions(module: nn.Module) -> None:
    """Dense weights back in every :class:`PackedConv2d` under ``module`` (before editing weights in place)."""
    for child in module.modules():
        if isinstance(child, PackedConv2d):
            child.unpack()


__all__ = ["PackedConv2d", "bf16_packing_available", "pack_convolutions", "unpack_convolutions", "packing_available"]
