"""The building blocks of the diffusion UNet (:class:`ldm.modules.diffusionmodules.openaimodel.UNetModel`):
the timestep-aware sequential container, the sinusoidal ``Timestep`` module, 2x up/downsampling, the
timestep-conditioned ``ResBlock`` and the self-attention ``AttentionBlock`` (guided-diffusion, Dhariwal & Nichol
2021). Attribute names are the released checkpoint keys below each ``input_blocks.N.M`` / ``output_blocks.N.M``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

Context = Union[torch.Tensor, Sequence[torch.Tensor], None]


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to TimestepBlocks and ``context`` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Context = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Timestep(nn.Module):
    """Parameter-free sinusoidal embedding module: (B,) steps -> (B, dim) float32 (SAI2/SGM ``Timestep``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (spatial axes only for 3-D signals), optionally followed by a 3x3 conv."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv (key ``op``) or average pooling."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (guided-diffusion ``ResBlock``).

    Keys: ``in_layers.{0: norm, 2: conv}``, ``emb_layers.1`` (Linear), ``out_layers.{0: norm, 3: conv}``,
    ``skip_connection`` (1x1 or 3x3 conv when the channel count changes, else Identity).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False, dims)
            self.x_upd: nn.Module = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) features; emb: (B, E) timestep embedding -> (B, out_channels, ...)."""
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map (guided-diffusion; used when there is no text context).

    Keys: ``norm``, ``qkv`` (1x1 Conv1d to 3C), ``proj_out``. ``use_new_attention_order`` splits q/k/v before the
    heads (``QKVAttention``); the legacy order splits heads first (``QKVAttentionLegacy``).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) -> same shape."""
        return checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        length = qkv.shape[-1]
        heads, ch = self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        dtype = q.dtype
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B*H, T, ch)
        if dtype == torch.float16:  # same overflow concern as ldm.modules.attention.attention
            q, k, v = q.float(), k.float(), v.float()
        h = F.scaled_dot_product_attention(q, k, v).to(dtype).transpose(1, 2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)
