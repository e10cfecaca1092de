"""Small building blocks shared by the diffusion UNet and its embedders.

These are the only copies in the project: the time embedding used by the UNet, by the unCLIP noise-level
embedding and by the SDXL size/crop embedders all come from :func:`timestep_embedding`.
Numerics follow CV ``ldm/modules/diffusionmodules/util.py`` (float32 frequencies, ``[cos | sin]`` order).
"""

from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
        timesteps: shape (B,), integer or float steps (any dtype; converted to float32).
        dim: output width D.
        max_period: controls the lowest frequency, ``exp(-ln(max_period) * i / (D/2))``.
        repeat_only: if True, return the raw timesteps repeated D times instead.

    Returns:
        float32 tensor (B, D): ``[cos(t * f_0..f_{D/2-1}) | sin(...)]`` (cos half first, CV util.py), with one
        zero column appended when D is odd.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim).float()
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (CV util.py ``GroupNorm32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # The CPU kernel reads bfloat16 and computes the statistics and the affine map in float32 (torch's
            # mixed-type GroupNorm): the same float32 computation, without a float32 copy of x in and out
            # (7 -> 1 ms at 2 x 320 x 64 x 64 channels_last; equal to the upcast path but for rare 1-ulp
            # differences from the order of the float32 sums).
            return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32 groups, eps 1e-5, float32 compute."""
    return GroupNorm32(32, channels)


def zero_module(module: ModuleT) -> ModuleT:
    """Zero a module's parameters in place and return it (a no-op on the meta device)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-, 2- or 3-D average pooling layer."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Linear:
    """``nn.Linear`` (kept as a function for parity with the original module layout)."""
    return nn.Linear(*args, **kwargs)


def checkpoint(func: Callable[..., torch.Tensor], *inputs: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Gradient checkpointing when ``enabled`` and gradients are being recorded; a plain call otherwise.

    Checkpointing only trades compute for memory during training; at inference it would be pure overhead.
    """
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
