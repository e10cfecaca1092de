"""Cross-attention transformer blocks of the latent-diffusion UNet.

Layout and parameter names follow the released checkpoints (CV / SAI2 / SGM ``ldm/modules/attention.py``):
``attn1`` (self-attention), ``attn2`` (cross-attention to the text context), ``ff`` (GEGLU feed-forward),
``norm1..3``; a :class:`SpatialTransformer` wraps them with ``norm``, ``proj_in``, ``transformer_blocks`` and
``proj_out``. The attention product itself is :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint as maybe_checkpoint
from ldm.modules.diffusionmodules.util import zero_module

# Attention types accepted from configs. xformers and PyTorch SDPA compute the same softmax attention, so all
# of these map to scaled_dot_product_attention (SGM attention.py lists "softmax" and "softmax-xformers").
ATTENTION_TYPES = ("softmax", "softmax-xformers", "vanilla", "vanilla-xformers", "xformers", "sdpa")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention, ``softmax(q k^T / sqrt(d)) v``.

    Args:
        q: (B, N, H*d) queries; k, v: (B, M, H*d) keys and values.
        heads: number of heads H.

    Returns:
        (B, N, H*d) in the dtype of ``q``.

    In float16, q and k (and v, since SDPA needs one dtype) are upcast to float32 first. SD 2.x's 768-v
    model produces attention logits beyond the float16 range (65504); computed in half precision they overflow
    to inf and the softmax returns NaN, giving black images (facts.md section 2: SAI2 computes q.k^T and the
    softmax in float32 by default, ``ATTN_PRECISION="fp32"``, to avoid exactly this). SDPA's fused kernels
    accumulate in float32, but its math fallback (CPU, unusual shapes) does not, so the upcast is explicit here.
    bfloat16 has float32's exponent range and is left as is.
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) over ``context`` (B, M, context_dim), self if None.

    Keys: ``to_q``, ``to_k``, ``to_v`` (no bias) and ``to_out.0`` (with bias; ``to_out.1`` is dropout).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        **ignored: object,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, M, context_dim) or None -> (B, N, query_dim)."""
        if mask is not None:
            raise NotImplementedError("attention masks are not used by any Stable Diffusion model")
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer"): a * gelu(b), [a | b] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP, keys ``net.0`` (GEGLU ``.proj`` or Linear+GELU), ``net.2`` (output Linear)."""

    def __init__(
        self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention, GEGLU MLP, each with a residual (CV attention.py).

    With ``disable_self_attn`` the first attention also attends to the context (SGM option).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
        attn_mode: str = "softmax",
        **ignored: object,
    ) -> None:
        super().__init__()
        if attn_mode not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention type {attn_mode!r}; expected one of {ATTENTION_TYPES}")
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head,
            dropout=dropout,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim); context: (B, M, context_dim) -> (B, N, dim)."""
        if context is None:
            return maybe_checkpoint(self._forward, x, enabled=self.checkpoint)
        return maybe_checkpoint(self._forward, x, context, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022, LDM section 3.3).

    GroupNorm (eps 1e-6) -> proj_in -> ``depth`` BasicTransformerBlocks -> proj_out (zero-initialised), plus the
    input as a residual. ``use_linear`` selects Linear projections applied after flattening (SD 2.x, SDXL)
    instead of 1x1 convolutions before it (SD 1.x).

    ``context_dim`` may be an int or a list with one entry per block (SGM); a list whose length differs from
    ``depth`` must hold one repeated value, which then applies to every block (SGM behaviour).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[Union[int, Sequence[int]]] = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        attn_type: str = "softmax",
        use_checkpoint: bool = False,
        **ignored: object,
    ) -> None:
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dims = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) != depth:
                if any(c != context_dims[0] for c in context_dims):
                    raise ValueError(
                        f"context_dim {context_dims} has {len(context_dims)} different entries for a depth of {depth}"
                    )
                context_dims = [context_dims[0]] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint, attn_mode=attn_type,
            )
            for d in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.use_linear = use_linear

    def forward(
        self, x: torch.Tensor, context: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None
    ) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, M, D), or a list with one context per block -> (B, C, H, W)."""
        if not isinstance(context, (list, tuple)):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[i] if len(context) > 1 else context[0])
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
