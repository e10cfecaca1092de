"""AutoencoderKL: the first stage of latent diffusion (CV ``ldm/models/autoencoder.py``, SGM ``AutoencoderKL``).

Inference-only: the training parameters of the original configs (``lossconfig``, ``monitor``, ``ema_decay``,
...) are accepted so that those configs instantiate unchanged, and ignored. No loss module is built, so the
state_dict holds exactly the released keys: ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.models.vae_tiling import Tiling, tiled_decode
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution, Generators

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    """KL-regularised VAE (Rombach et al. 2022, section 3): x (B, 3, H, W) in [-1, 1] <-> z (B, embed_dim, H/f, W/f).

    Args:
        ddconfig: Encoder/Decoder hyperparameters (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
            double_z (must be true), in_channels, out_ch, resolution, dropout, attn_type).
        embed_dim: latent channels (4 for every Stable Diffusion VAE).
        lossconfig, ckpt_path, ignore_keys, image_key, colorize_nlabels, monitor, ema_decay, learn_logvar,
        max_batch_size: training-time settings of the originals, accepted and ignored. Weights are loaded by
            ``ldm.checkpoint``, never from ``ckpt_path`` here.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Optional[Mapping[str, Any]] = None,
        ckpt_path: Optional[str] = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: Optional[int] = None,
        monitor: Optional[str] = None,
        ema_decay: Optional[float] = None,
        learn_logvar: bool = False,
        max_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (the encoder predicts mean and logvar)")
        if ckpt_path is not None:
            logger.warning("AutoencoderKL: ckpt_path %r ignored; weights come from the model checkpoint", ckpt_path)
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.factor = 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 4))) - 1)
        self.tiling: Optional[Tiling] = None  # --vae-tiling: decode in overlapping tiles (ldm.models.vae_tiling)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f) latents (unscaled)."""
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) unscaled latents -> (B, out_ch, h*f, w*f), nominally in [-1, 1] (tile by tile
        with :attr:`tiling` set)."""
        if self.tiling is not None:
            return tiled_decode(lambda part: self.decoder(self.post_quant_conv(part)), z, self.factor, self.tiling)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: Generators = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct x: returns (decode(z), posterior), z a posterior sample (or its mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
