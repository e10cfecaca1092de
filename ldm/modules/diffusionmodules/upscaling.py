"""Noise augmentation of a conditioning input with its own DDPM schedule (SAI2 ``ldm/modules/diffusionmodules/
upscaling.py``): the x4 upscaler's low-res image (:class:`ImageConcatWithNoiseAugmentation`, keys
``low_scale_model.*``) and, through the same schedule code, unCLIP's image embeddings
(:class:`ldm.modules.encoders.image_embedders.CLIPEmbeddingNoiseAugmentation`, keys ``noise_augmentor.*``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.sampling.schedules import make_beta_schedule


class AbstractLowScaleModel(nn.Module):
    """A noise schedule of its own, as persistent float32 buffers computed in float64 (SAI2 ``upscaling.py``
    ``AbstractLowScaleModel.register_schedule``): ``betas``, ``alphas_cumprod``, ... (:data:`SCHEDULE_BUFFERS`)."""

    SCHEDULE_BUFFERS = (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    )
    keep_fp32_buffers = SCHEDULE_BUFFERS

    def __init__(self, noise_schedule_config: Optional[Mapping[str, Any]] = None, max_noise_level: int = 1000) -> None:
        super().__init__()
        self.max_noise_level = int(max_noise_level)
        self._register_schedule(**dict(noise_schedule_config or {}))

    def _register_schedule(self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                           linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        acp = np.cumprod(1.0 - betas, axis=0)
        self.num_timesteps = int(timesteps)
        buffers = {
            "betas": betas,
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": np.append(1.0, acp[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(acp),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"))

    def check_levels(self, levels: torch.Tensor) -> None:
        """Refuse levels outside [0, max_noise_level) (SdgenError)."""
        top = min(self.max_noise_level, self.num_timesteps)
        if int(levels.min()) < 0 or int(levels.max()) >= top:
            raise SdgenError(f"noise level must be in 0..{top - 1}, got {sorted(set(levels.tolist()))}")

    def q_sample(self, x: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """sqrt(abar[L]) x + sqrt(1 - abar[L]) noise per sample (float32 buffers; SAI2 ``q_sample``).

        Args:
            x: (B, ...) clean input; levels: (B,) int64; noise: standard normal noise shaped like ``x``.
        """
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        levels = levels.to(self.sqrt_alphas_cumprod.device)
        a = self.sqrt_alphas_cumprod.gather(-1, levels).reshape(shape).to(x.device)
        s = self.sqrt_one_minus_alphas_cumprod.gather(-1, levels).reshape(shape).to(x.device)
        return a * x + s * noise.to(device=x.device, dtype=x.dtype)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """The x4 upscaler's low-res conditioning: the image noise-augmented to a level that is also the UNet's class
    label (SAI2 ``upscaling.py`` ``ImageConcatWithNoiseAugmentation``; the upscaler yaml: linear 0.0001 -> 0.02,
    ``max_noise_level`` 350)."""

    def __init__(self, noise_schedule_config: Optional[Mapping[str, Any]] = None, max_noise_level: int = 1000,
                 to_cuda: bool = False) -> None:
        super().__init__(noise_schedule_config, max_noise_level)

    def forward(self, x: torch.Tensor, noise_level: int | torch.Tensor | None = None,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, h, w) in [-1, 1] -> (augmented x (B, 3, h, w) float32, levels (B,) int64).

        ``noise_level`` None draws uniform levels in [0, max_noise_level) (training); ``noise`` None draws it from
        ``generator`` on the CPU.
        """
        b = x.shape[0]
        if noise_level is None:
            levels = torch.randint(0, self.max_noise_level, (b,), generator=generator)
        else:
            levels = torch.as_tensor(noise_level, dtype=torch.long).reshape(-1).expand(b).clone()
        self.check_levels(levels)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        x = x.float()
        return self.q_sample(x, levels, noise.float()), levels.to(x.device)
