"""unCLIP's image side: CLIP image embedders and the noise augmentation of their embeddings.

Checkpoint keys: ``embedder.model.*`` (:class:`ClipImageEmbedder` = OpenAI ViT-L/14 for unCLIP-L,
:class:`FrozenOpenCLIPImageEmbedder` = OpenCLIP ViT-H/14 for -H) and ``noise_augmentor.*``
(:class:`CLIPEmbeddingNoiseAugmentation`). The towers are built from their architecture configs, never
downloaded. Sources: SAI2 ``ldm/modules/encoders/modules.py`` and ``ldm/modules/diffusionmodules/upscaling.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.errors import SdgenError
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import AbstractEncoder, build_open_clip
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH
from ldm.modules.diffusionmodules.upscaling import AbstractLowScaleModel

# OpenAI `clip` package architectures (clip/model.py::build_model argument names).
OPENAI_CLIP_CONFIGS: dict[str, dict[str, int]] = {
    "ViT-L/14": dict(
        embed_dim=768,
        image_resolution=224,
        vision_layers=24,
        vision_width=1024,
        vision_patch_size=14,
        context_length=77,
        vocab_size=49408,
        transformer_width=768,
        transformer_heads=12,
        transformer_layers=12,
    ),
}

# CLIP image normalisation (SAI2 ClipImageEmbedder / FrozenOpenCLIPImageEmbedder).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

class _ImageEmbedder(AbstractEncoder):
    """Shared CLIP image preprocessing (SAI2 ``ClipImageEmbedder.preprocess``)."""

    def __init__(self, antialias: bool) -> None:
        super().__init__()
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, device="cpu"), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD, device="cpu"), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> resized straight to the tower's size (bicubic, align_corners, antialias;
        no crop, aspect ratio not kept), mapped to [0, 1], CLIP-normalised."""
        import kornia

        size = tuple(self.model.visual.image_size)
        x = kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=self.antialias)
        x = (x + 1.0) / 2.0
        return kornia.enhance.normalize(x, self.mean.to(x), self.std.to(x))


class ClipImageEmbedder(_ImageEmbedder):
    """OpenAI CLIP image encoder for SD 2.1 unCLIP-L (SAI2 ``ClipImageEmbedder``, ``clip`` package model).

    Keeps the complete OpenAI CLIP (``model.visual.*`` plus the unused text half), as the checkpoint does;
    built as open_clip's equivalent ``CLIP`` with QuickGELU, which has the same parameter names.
    ``model_cfg`` overrides the ``clip`` package's ``build_model`` sizes (embed_dim, vision_width, ...).
    ``ucg_rate`` is accepted for config compatibility; embedding dropout is a training matter.
    """

    def __init__(
        self,
        model: str = "ViT-L/14",
        jit: bool = False,
        device: str = "cpu",
        antialias: bool = True,
        ucg_rate: float = 0.0,
        freeze: bool = True,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(antialias)
        if model not in OPENAI_CLIP_CONFIGS and not model_cfg:
            raise SdgenError(f"ClipImageEmbedder: unknown OpenAI CLIP model {model!r}")
        c = {**OPENAI_CLIP_CONFIGS.get(model, {}), **dict(model_cfg or {})}
        open_clip_cfg = dict(
            embed_dim=c["embed_dim"],
            quick_gelu=True,
            # OpenAI's VisionTransformer uses width // 64 heads
            vision_cfg=dict(
                image_size=c["image_resolution"],
                layers=c["vision_layers"],
                width=c["vision_width"],
                patch_size=c["vision_patch_size"],
                head_width=64,
            ),
            text_cfg=dict(
                context_length=c["context_length"],
                vocab_size=c["vocab_size"],
                width=c["transformer_width"],
                heads=c["transformer_heads"],
                layers=c["transformer_layers"],
            ),
        )
        self.model = build_open_clip(model.replace("/", "-"), open_clip_cfg, keep="all")
        self.ucg_rate = ucg_rate
        if freeze:
            self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> projected, not normalised embedding (B, embed_dim) in x's dtype."""
        return self.model.visual(self.preprocess(x)).to(x.dtype)


class FrozenOpenCLIPImageEmbedder(_ImageEmbedder):
    """OpenCLIP image encoder for SD 2.1 unCLIP-H (SAI2 ``FrozenOpenCLIPImageEmbedder``, layer "pooled").

    The text ``transformer`` is deleted; token/positional embeddings, ln_final, text_projection and
    logit_scale stay (they are checkpoint keys). Output: ``model.visual(preprocess(x))``.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cpu",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "pooled",
        antialias: bool = True,
        ucg_rate: float = 0.0,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(antialias)
        if layer != "pooled":
            raise SdgenError(f"FrozenOpenCLIPImageEmbedder: only layer 'pooled' exists, not {layer!r}")
        self.model = build_open_clip(arch, model_cfg, keep="vision")
        self.max_length = max_length
        self.layer = layer
        self.ucg_rate = ucg_rate
        if freeze:
            self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> projected embedding (B, embed_dim)."""
        return self.model.visual(self.preprocess(x))


class CLIPEmbeddingNoiseAugmentation(AbstractLowScaleModel):
    """unCLIP image-embedding noise augmentation (SAI2 ``CLIPEmbeddingNoiseAugmentation``).

    Own DDPM schedule (persistent float32 buffers ``betas``, ``alphas_cumprod``, ...; computed in float64).
    forward: normalise with (data_mean, data_std), q_sample at the noise level, de-normalise; the level is also
    returned as a ``timestep_dim``-wide sinusoidal embedding. The ADM vector is cat(augmented, level_emb).

    ``data_mean``/``data_std`` (1, timestep_dim) are non-persistent: zeros/ones, or Karlo's
    ``ViT-L-14_stats.th`` (a (mean, std) pair) from ``clip_stats_path``; never part of the checkpoint.
    All these buffers stay float32 when the model is loaded in half precision (``keep_fp32_buffers``); the
    outputs are cast to the input's dtype.
    """

    keep_fp32_buffers = (*AbstractLowScaleModel.SCHEDULE_BUFFERS, "data_mean", "data_std")

    def __init__(
        self,
        noise_schedule_config: Mapping[str, Any],
        timestep_dim: int = 256,
        clip_stats_path: str | None = None,
        max_noise_level: int = 1000,
    ) -> None:
        super().__init__(noise_schedule_config, max_noise_level)
        self.timestep_dim = timestep_dim
        mean, std = self._load_stats(clip_stats_path, timestep_dim)
        self.register_buffer("data_mean", mean[None, :], persistent=False)
        self.register_buffer("data_std", std[None, :], persistent=False)

    @staticmethod
    def _load_stats(path: str | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if path is None:
            return torch.zeros(dim, device="cpu"), torch.ones(dim, device="cpu")
        if not Path(path).is_file():
            raise SdgenError(
                f"clip_stats_path {str(path)!r} not found: it is Karlo's ViT-L-14_stats.th (CLIP-L embedding "
                "mean/std, not part of the checkpoint); download it there or set clip_stats_path: null"
            )
        mean, std = torch.load(path, map_location="cpu", weights_only=True)
        return mean.float().reshape(-1), std.float().reshape(-1)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean) / self.data_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std + self.data_mean

    def forward(
        self,
        x: torch.Tensor,
        noise_level: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise-augment image embeddings.

        Args:
            x: (B, D) image embeddings.
            noise_level: int or (B,) int64 levels in [0, max_noise_level); None draws uniform levels
                (training) from ``generator``.
            generator: CPU generator for the level (if drawn) and the noise (if not given).
            noise: (B, D) standard normal noise; drawn from ``generator`` on the CPU when None.

        Returns:
            (augmented embedding (B, D), level embedding (B, timestep_dim)), both in x's dtype.
        """
        b = x.shape[0]
        if noise_level is None:
            levels = torch.randint(0, self.max_noise_level, (b,), generator=generator)
        else:
            levels = torch.as_tensor(noise_level, dtype=torch.long).reshape(-1).expand(b)
        if int(levels.min()) < 0 or int(levels.max()) >= min(self.max_noise_level, self.num_timesteps):
            raise SdgenError(f"noise level must be in [0, {self.max_noise_level - 1}], got {levels.tolist()}")
        levels = levels.to(x.device)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        compute = torch.promote_types(x.dtype, torch.float32)  # half-precision inputs are noised in float32
        noise = noise.to(device=x.device, dtype=compute)
        shape = (b, *([1] * (x.ndim - 1)))
        a = self.sqrt_alphas_cumprod.gather(-1, levels).reshape(shape).to(compute)
        s = self.sqrt_one_minus_alphas_cumprod.gather(-1, levels).reshape(shape).to(compute)
        z = self.unscale(a * self.scale(x.to(compute)) + s * noise)
        level_emb = timestep_embedding(levels, self.timestep_dim)
        return z.to(x.dtype), level_emb.to(x.dtype)
