"""The Karlo prior network: a causal transformer that predicts a CLIP image embedding (x0) from text.

Kakao Brain's Karlo v1.0-alpha ``PriorTransformer`` (SAI2 ``ldm/modules/karlo/kakao/modules/xf.py``), with the
checkpoint's parameter names (``time_embed``, ``text_enc_proj``, ``text_emb_proj``, ``clip_img_proj``,
``out_proj``, ``positional_embedding``, ``prd_emb``, ``final_ln``, ``transformer.resblocks.N.{ln_1, attn.c_qkv,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``).

Each row is a sequence of ``text_ctx + 4`` tokens (81 for the released model):

====================  ==========================================================
positions 0..76       ``text_enc_proj`` of the CLIP text tower's 77 token states
position 77           ``text_emb_proj`` of the pooled text embedding
position 78           ``time_embed`` of the sinusoidal embedding of t ([cos | sin])
position 79           ``clip_img_proj`` of the noisy (normalised) image embedding
position 80           the learned query ``prd_emb``; its final state is the output
====================  ==========================================================

The attention is causal, and padded text positions are hidden as keys. So positions 0..77 see only text: their
states, and every layer's keys and values there, do not depend on x_t or t. :meth:`PriorTransformer.encode_text`
computes that prefix once per prompt (a :class:`TextPrefix`); :meth:`PriorTransformer.step` then runs only the
last three positions against it at each sampling step (about 27x less work for 81 tokens). :meth:`forward` is the
whole 81-token computation of the original, which the cached one equals up to float rounding.

Attention weights are fused per head: ``c_qkv``'s outputs are viewed as (heads, 3 * head_dim) and split into
q | k | v *within* each head (not torch's [all q; all k; all v]). LayerNorms compute in float32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.diffusionmodules.util import timestep_embedding

#: tokens after the text: the pooled text, the time, the noisy embedding, the query
EXTRA_TOKENS = 4
#: of which the last three depend on x_t and t (the rest is the text prefix)
STEP_TOKENS = 3


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, cast back to the input dtype (Karlo ``xf.py``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QKVAttention(nn.Module):
    """Multi-head attention with a per-head fused q | k | v projection (``c_qkv``) and an output ``c_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, W) -> q, k, v, each (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.c_qkv(x).view(b, n, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v, heads merged -> (B, Nq, W) through ``c_proj``.

        The original scales q and k by d^(-1/4) each; the product is the same 1 / sqrt(d)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        b, _, n, _ = out.shape
        return self.c_proj(out.transpose(1, 2).reshape(b, n, -1))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x += attn(ln_1(x)); x += mlp(ln_2(x)), MLP width 4x with exact (erf) GELU."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = QKVAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
        """x (B, N, W); ``past`` keys / values (B, heads, P, d) of earlier positions prepended to this block's;
        ``bias`` (B, 1, N, P + N) additive. Returns (x after the block, this block's k, v for x's positions)."""
        q, k, v = self.attn.qkv(self.ln_1(x))
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        x = x + self.attn.attend(q, keys, values, bias)
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class Transformer(nn.Module):
    """Holder of the blocks (checkpoint keys ``transformer.resblocks.N.*``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


@dataclass
class TextPrefix:
    """What the 78 text positions contribute to every step: each layer's keys and values there and which of
    them are visible.

    Attributes:
        keys, values: (B, layers, heads, text_ctx + 1, head_dim).
        visible: (B, text_ctx + 1) bool, False at padded text positions.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor

    def as_cond(self) -> dict[str, torch.Tensor]:
        """A cond dict (batch first), so classifier-free guidance concatenates it like any other."""
        return {"prefix_keys": self.keys, "prefix_values": self.values, "prefix_visible": self.visible}

    @classmethod
    def from_cond(cls, cond: dict[str, torch.Tensor]) -> "TextPrefix":
        return cls(cond["prefix_keys"], cond["prefix_values"], cond["prefix_visible"])

    def select(self, rows: torch.Tensor) -> "TextPrefix":
        """The prefixes of ``rows`` (an index tensor), e.g. one prompt's prefix repeated for a batch."""
        return TextPrefix(self.keys[rows], self.values[rows], self.visible[rows])


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean "may attend" mask -> an additive float mask (0 / -inf)."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, float("-inf"))


class PriorTransformer(nn.Module):
    """Karlo's prior network (module docstring). Sizes as ``configs/karlo/prior_1B_vit_l.yaml``.

    Args:
        text_ctx: text positions (77).
        xf_width, xf_layers, xf_heads: transformer width, depth and heads (2048, 20, 32 for the released model).
        xf_final_ln: a final LayerNorm before ``out_proj`` (True).
        clip_dim: width of the CLIP embeddings (768 for ViT-L/14): the pooled text, the image embedding.
        text_width: width of the text tower's token states (None: ``clip_dim``, as in Karlo, where both are 768).
    """

    def __init__(self, text_ctx: int = 77, xf_width: int = 2048, xf_layers: int = 20, xf_heads: int = 32,
                 xf_final_ln: bool = True, clip_dim: int = 768, text_width: Optional[int] = None) -> None:
        super().__init__()
        self.text_ctx, self.width, self.clip_dim = text_ctx, xf_width, clip_dim
        self.text_width = text_width or clip_dim
        self.heads = xf_heads
        self.time_embed = nn.Sequential(nn.Linear(xf_width, xf_width), nn.SiLU(), nn.Linear(xf_width, xf_width))
        self.text_enc_proj = nn.Linear(self.text_width, xf_width)
        self.text_emb_proj = nn.Linear(clip_dim, xf_width)
        self.clip_img_proj = nn.Linear(clip_dim, xf_width)
        self.out_proj = nn.Linear(xf_width, clip_dim)
        self.transformer = Transformer(xf_width, xf_layers, xf_heads)
        self.final_ln = LayerNorm(xf_width) if xf_final_ln else None
        self.positional_embedding = nn.Parameter(torch.empty(1, text_ctx + EXTRA_TOKENS, xf_width))
        self.prd_emb = nn.Parameter(torch.randn((1, 1, xf_width)))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def _text_tokens(self, text_emb: torch.Tensor, text_enc: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, text_ctx, Dt) -> the 78 prefix tokens (B, text_ctx + 1, W) with their positions."""
        dtype = self.text_enc_proj.weight.dtype
        tokens = torch.cat([self.text_enc_proj(text_enc.to(dtype)), self.text_emb_proj(text_emb.to(dtype))[:, None]], 1)
        return tokens + self.positional_embedding[:, : self.text_ctx + 1].to(tokens.dtype)

    def _step_tokens(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, D), t (B,) -> the time, image and query tokens (B, 3, W) with their positions."""
        dtype = self.clip_img_proj.weight.dtype
        time = self.time_embed(timestep_embedding(t, self.width).to(device=x.device, dtype=dtype))
        tokens = torch.stack([time, self.clip_img_proj(x.to(dtype)), self.prd_emb[:, 0].to(dtype).expand(len(x), -1)], 1)
        return tokens + self.positional_embedding[:, self.text_ctx + 1:].to(tokens.dtype)

    def _output(self, tokens: torch.Tensor) -> torch.Tensor:
        last = tokens[:, -1]
        if self.final_ln is not None:
            last = self.final_ln(last)
        return self.out_proj(last).float()

    def encode_text(self, text_emb: torch.Tensor, text_enc: torch.Tensor, mask: torch.Tensor) -> TextPrefix:
        """The text prefix of a batch: pooled text (B, D), token states (B, text_ctx, Dt), mask (B, text_ctx) bool
        (True at real tokens) -> :class:`TextPrefix`."""
        x = self._text_tokens(text_emb, text_enc)
        n = x.shape[1]
        visible = torch.cat([mask.bool(), mask.new_ones(len(mask), 1, dtype=torch.bool)], 1)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        bias = _additive(causal[None] & visible[:, None, :])[:, None]
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block(x, bias)
            keys.append(k)
            values.append(v)
        return TextPrefix(torch.stack(keys, 1), torch.stack(values, 1), visible)

    def step(self, x: torch.Tensor, t: torch.Tensor, prefix: TextPrefix) -> torch.Tensor:
        """The x0 prediction (B, D) float32 for noisy embeddings ``x`` (B, D) at timesteps ``t`` (B,), given the
        rows' text prefix: only the last three positions run, against the prefix's keys and values."""
        tokens = self._step_tokens(x, t)
        own = torch.ones(STEP_TOKENS, STEP_TOKENS, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat([prefix.visible[:, None, :].expand(-1, STEP_TOKENS, -1),
                             own[None].expand(len(x), -1, -1)], 2)
        bias = _additive(allowed)[:, None]
        for layer, block in enumerate(self.blocks):
            past = (prefix.keys[:, layer].to(tokens.dtype), prefix.values[:, layer].to(tokens.dtype))
            tokens, _, _ = block(tokens, bias, past)
        return self._output(tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_enc: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """The original's whole computation on all ``text_ctx + 4`` positions (no cache): x0 (B, D) float32."""
        tokens = torch.cat([self._text_tokens(text_emb, text_enc), self._step_tokens(x, t)], 1)
        n = tokens.shape[1]
        visible = torch.cat([mask.bool(), mask.new_ones(len(mask), EXTRA_TOKENS, dtype=torch.bool)], 1)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        bias = _additive(causal[None] & visible[:, None, :])[:, None]
        for block in self.blocks:
            tokens, _, _ = block(tokens, bias)
        return self._output(tokens)


__all__ = ["PriorTransformer", "TextPrefix", "LayerNorm"]
