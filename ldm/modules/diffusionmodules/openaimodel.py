"""The diffusion UNet of Stable Diffusion 1.x, 2.x, 2.1-unCLIP and SDXL (one class for all of them).

Architecture of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", openai/guided-diffusion) with the
SpatialTransformer cross-attention of Rombach et al. 2022 (LDM). Module names reproduce the released checkpoint
keys (``input_blocks.N.M``, ``middle_block``, ``output_blocks``, ``out``, ``time_embed``, ``label_emb``); the
hyperparameters are those of CV / SAI2 ``ldm/modules/diffusionmodules/openaimodel.py`` and SGM
``sgm/modules/diffusionmodules/openaimodel.py``, so the original configs instantiate unchanged.

The building blocks (``ResBlock``, ``Downsample``, ``Upsample``, ``AttentionBlock``, ``TimestepEmbedSequential``,
``Timestep``) live in :mod:`ldm.modules.diffusionmodules.unet_blocks` and are re-exported here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.unet_blocks import (
    AttentionBlock,
    Context,
    Downsample,
    ResBlock,
    Timestep,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
)
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module

__all__ = [
    "AttentionBlock",
    "Context",
    "Downsample",
    "ResBlock",
    "Timestep",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
]


def _as_per_level(value: Union[int, Sequence[int]], levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} must be an int or have one entry per level ({levels}), got {value}")
    return value


class UNetModel(nn.Module):
    """Timestep- and text-conditioned UNet; ``forward(x, timesteps, context, y) -> eps or v``.

    Accepts every parameter of the CV/SAI2 and SGM UNetModel configs. Main ones:
        in_channels / out_channels / model_channels: latent channels in and out, base width.
        num_res_blocks (int | per level), channel_mult (per level), attention_resolutions (downsampling factors
        with attention), transformer_depth (int | per level; middle block: transformer_depth_middle or the last
        entry), context_dim (int | list), num_heads or num_head_channels, use_linear_in_transformer.
        num_classes: None, an int (class labels, nn.Embedding), "continuous" (a scalar per row), "timestep" (a
        step per row, sinusoidally embedded) or "sequential" with adm_in_channels (ADM vector ->
        label_emb.0.{0,2} Linear layers; unCLIP, SDXL).
    Ignored at inference: image_size, use_checkpoint (only used while training), use_fp16 / use_bf16 (the
    computation dtype is the dtype of the loaded weights), use_fairscale_checkpoint, offload_to_cpu.
    """

    channels_last = False  # NHWC activations: set by ldm.generation.inference.use_channels_last

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[Union[int, str]] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim: Optional[Union[int, Sequence[int]]] = None,
        n_embed: Optional[int] = None,
        legacy: bool = True,
        disable_self_attentions: Optional[Sequence[bool]] = None,
        num_attention_blocks: Optional[Sequence[int]] = None,
        disable_middle_self_attn: bool = False,
        disable_middle_transformer: bool = False,
        use_linear_in_transformer: bool = False,
        spatial_transformer_attn_type: str = "softmax",
        adm_in_channels: Optional[int] = None,
        transformer_depth_middle: Optional[int] = None,
        image_size: Optional[int] = None,
        use_fairscale_checkpoint: bool = False,
        offload_to_cpu: bool = False,
    ) -> None:
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the cross-attention width)")
        # SGM configs omit use_spatial_transformer: a context width always means cross-attention transformers.
        spatial = use_spatial_transformer or context_dim is not None
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        levels = len(channel_mult)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = _as_per_level(num_res_blocks, levels, "num_res_blocks")
        depth = _as_per_level(transformer_depth, levels, "transformer_depth")
        depth_middle = depth[-1] if transformer_depth_middle is None else transformer_depth_middle
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError("disable_self_attentions needs one entry per level")
        if num_attention_blocks is not None:
            if len(num_attention_blocks) != levels or any(
                n > r for n, r in zip(num_attention_blocks, self.num_res_blocks)
            ):
                raise ValueError("num_attention_blocks needs one entry per level, each <= num_res_blocks")
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = list(channel_mult)
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb: nn.Module = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "timestep":
                self.label_emb = nn.Sequential(
                    Timestep(model_channels),
                    nn.Sequential(
                        linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
                    ),
                )
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError('num_classes "sequential" needs adm_in_channels')
                self.label_emb = nn.Sequential(
                    nn.Sequential(
                        linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
                    )
                )
            else:
                raise ValueError(f"unsupported num_classes {num_classes!r}")

        def heads_for(ch: int) -> tuple[int, int]:
            """(number of heads, head width) at width ``ch`` (CV/SAI2 openaimodel, incl. the legacy rule)."""
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if spatial else num_head_channels
            return heads, dim_head

        def attention_layer(ch: int, level: int, n_depth: int, upsample_heads: bool, no_self_attn: bool) -> nn.Module:
            heads, dim_head = heads_for(ch)
            if spatial:
                return SpatialTransformer(
                    ch, heads, dim_head, depth=n_depth, context_dim=context_dim, disable_self_attn=no_self_attn,
                    use_linear=use_linear_in_transformer, attn_type=spatial_transformer_attn_type,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                ch, num_heads=num_heads_upsample if upsample_heads else heads, num_head_channels=dim_head,
                use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order,
            )

        def disabled_sa(level: int) -> bool:
            return bool(disable_self_attentions[level]) if disable_self_attentions is not None else False

        def wants_attention(ds: int, level: int, index: int) -> bool:
            return ds in self.attention_resolutions and (
                num_attention_blocks is None or index < num_attention_blocks[level]
            )

        res_kwargs = dict(dims=dims, use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [
                    ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels, **res_kwargs)
                ]
                ch = mult * model_channels
                if wants_attention(ds, level, nr):
                    layers.append(attention_layer(ch, level, depth[level], False, disabled_sa(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != levels - 1:
                down: nn.Module = (
                    ResBlock(ch, time_embed_dim, dropout, out_channels=ch, down=True, **res_kwargs)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        if disable_middle_transformer:
            middle_attention: nn.Module = nn.Identity()
        else:
            middle_attention = attention_layer(ch, levels - 1, depth_middle, False, disable_middle_self_attn)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, **res_kwargs),
            middle_attention,
            ResBlock(ch, time_embed_dim, dropout, **res_kwargs),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [
                    ResBlock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult, **res_kwargs)
                ]
                ch = model_channels * mult
                if wants_attention(ds, level, i):
                    layers.append(attention_layer(ch, level, depth[level], True, disabled_sa(level)))
                if level and i == self.num_res_blocks[level]:
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, out_channels=ch, up=True, **res_kwargs)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in: that of its weights."""
        return self.time_embed[0].weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: Context = None,
        y: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Apply the network.

        Args:
            x: (B, in_channels, H, W) noisy latents (H, W divisible by 2**(levels-1)).
            timesteps: (B,) or scalar, integer or float DDPM step indices (0..999 for SD).
            context: (B, L, context_dim) cross-attention tokens (or a list with one tensor per transformer block).
            y: (B, adm_in_channels) ADM vector for num_classes "sequential", (B,) labels for int num_classes.

        Returns:
            (B, out_channels, H, W) in x's dtype: eps or v depending on the model's training target.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "y (class/ADM conditioning) must be given if and only if the model has num_classes "
                f"(num_classes={self.num_classes!r}, y given: {y is not None})"
            )
        dtype = self.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch {y.shape[0]}, x has batch {x.shape[0]}")
            if isinstance(self.num_classes, int) or self.num_classes == "timestep":
                emb = emb + self.label_emb(y).to(dtype)
            else:
                emb = emb + self.label_emb(y.to(dtype))
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        elif context is not None:
            context = [c.to(dtype) for c in context]

        h = x.to(dtype)
        if self.channels_last:  # NHWC activations for NHWC weights (ldm.generation.inference.use_channels_last)
            h = h.contiguous(memory_format=torch.channels_last)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.to(x.dtype)
