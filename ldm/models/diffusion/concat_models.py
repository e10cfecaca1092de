"""The SD 2 models whose UNet takes extra input channels: inpainting, depth-to-image and the x4 upscaler.

Inference counterparts of SAI2 ``ldm/models/diffusion/ddpm.py`` ``LatentFinetuneDiffusion`` (l.1496-1554),
``LatentInpaintDiffusion`` (l.1638-1678), ``LatentDepth2ImageDiffusion`` (l.1688-1729) and
``LatentUpscaleDiffusion`` (l.1358-1394): the same constructor parameters (so the released yamls instantiate)
and attribute names (so the released checkpoints load: ``depth_model.*``, ``low_scale_model.*``).

Each model turns a job's input image into its extra network inputs (:meth:`concat_inputs`), which its
conditioner (:class:`ldm.models.diffusion.concat_conditioners.ConcatConditioner`) puts into both branches of
classifier-free guidance: in the originals only the text differs between the halves.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import LatentDiffusion, module_dtype
from ldm.modules.distributions import sample_latents
from ldm.sampling.noise import make_generators
from ldm.util import instantiate_from_config

# constructor parameters of the originals that only matter for training (finetune_keys: the input-channel surgery
# of a 4-channel checkpoint, ddpm.py l.1536-1546; the c_concat_log_* logging range)
_FINETUNE_TRAINING = ("finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end")


def _pop_training(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in _FINETUNE_TRAINING if k in kwargs}


class LatentFinetuneDiffusion(LatentDiffusion):
    """A latent diffusion model with concatenated UNet inputs named by ``concat_keys`` (``hybrid`` conditioning).

    Subclasses implement :meth:`concat_inputs`.
    """

    #: image channels a job's input tensor carries (RGB, and e.g. the inpainting mask)
    input_channels = 3

    def __init__(self, concat_keys: Sequence[str] = (), *args: Any, **kwargs: Any) -> None:
        self.finetune_params = _pop_training(kwargs)
        super().__init__(*args, **kwargs)
        self.concat_keys = tuple(concat_keys)

    def make_conditioner(self, inputs: Any = None):
        """Text plus this model's concatenated inputs, the same in both guidance branches."""
        from ldm.models.diffusion.concat_conditioners import ConcatConditioner

        return ConcatConditioner(self, inputs)

    def concat_inputs(self, image: torch.Tensor, seeds: Sequence[int], latent_hw: tuple[int, int],
                      cache: dict[str, Any], noise_level: int = 0) -> dict[str, torch.Tensor]:
        """The extra network inputs of one batch: ``{"concat": (B, Cc, h, w), ...}``.

        Args:
            image: the batch's input (C, H, W) float32, RGB in [-1, 1] first (and any extra channels).
            seeds: one seed per image for its own draws (posterior sample, noise augmentation).
            latent_hw: the latent size (h, w).
            cache: per-input-image storage kept across batches (e.g. its VAE posterior or depth map).
            noise_level: the noise augmentation level (x4 upscaler).
        """
        raise NotImplementedError


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] -> {0, 1}: >= 0.5 repaints (SAI2 scripts/*/inpainting.py ``make_batch_sd``: 8-bit 127 keeps,
    128 repaints)."""
    return (mask >= 0.5).to(mask.dtype)


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """SD 2 (and SD 1.5) inpainting: UNet input = [noisy latent (4), mask (1), masked-image latent (4)].

    The mask is 1 where the image is repainted; the masked image is ``image * (mask < 0.5)``, i.e. the repainted
    region is 0 (mid grey) in [-1, 1]; its latent is a VAE posterior *sample* (``get_first_stage_encoding``);
    the mask is resized to the latent with nearest interpolation (SAI2 inpainting.py l.91-99).
    """

    input_channels = 4  # RGB + mask
    family = "inpaint"  # ldm.model_files.model_kind / ldm.defaults

    def __init__(self, concat_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image",
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(concat_keys, *args, **kwargs)
        self.masked_image_key = masked_image_key

    def concat_inputs(self, image: torch.Tensor, seeds: Sequence[int], latent_hw: tuple[int, int],
                      cache: dict[str, Any], noise_level: int = 0) -> dict[str, torch.Tensor]:
        """``{"concat": cat(mask (B,1,h,w), 0.18215 * sample(encode(masked image)) (B,4,h,w))}``."""
        if image.shape[0] != 4:
            raise SdgenError("an inpainting input needs its mask (image and mask as 4 channels)")
        if "posterior" not in cache:
            rgb, mask = image[None, :3], binarize_mask(image[None, 3:4])
            masked = rgb * (mask < 0.5)
            cache["posterior"] = self.encode_first_stage(masked.to(self.device))
            cache["mask"] = F.interpolate(mask, size=latent_hw).to(self.device)  # nearest, as the scripts
        latent = sample_latents(self, cache["posterior"], make_generators(seeds))
        mask = cache["mask"].expand(len(seeds), -1, -1, -1).float()
        return {"concat": torch.cat([mask, latent], dim=1)}


class LatentDepth2ImageDiffusion(LatentFinetuneDiffusion):
    """SD 2 depth-to-image: UNet input = [latent (4), depth (1)], the depth of the input image by MiDaS DPT-Hybrid
    (``depth_model``), resized bicubically to the latent and min-max scaled to [-1, 1] per image (SAI2
    scripts/gradio/depth2img.py l.75-92). A job's input may carry a given depth map as a 4th channel instead."""

    family = "depth"

    def __init__(self, depth_stage_config: Mapping[str, Any], concat_keys: Sequence[str] = ("midas_in",),
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(concat_keys, *args, **kwargs)
        self.depth_model = self._frozen(instantiate_from_config(depth_stage_config))

    def depth_of(self, image: torch.Tensor) -> torch.Tensor:
        """MiDaS relative inverse depth (1, 1, H', W') of an RGB image (3, H, W) in [-1, 1] (the network's
        input size: the shorter side near 384, multiples of 32)."""
        from ldm.modules.midas.transforms import midas_input

        device = next(self.depth_model.parameters()).device
        x = midas_input(image[None, :3].float()).to(device=device, dtype=module_dtype(self.depth_model))
        return self.depth_model(x).float()

    def concat_inputs(self, image: torch.Tensor, seeds: Sequence[int], latent_hw: tuple[int, int],
                      cache: dict[str, Any], noise_level: int = 0) -> dict[str, torch.Tensor]:
        """``{"concat": depth (B, 1, h, w) in [-1, 1]}`` (computed once per input image)."""
        from ldm.modules.midas.transforms import depth_conditioning

        if "depth" not in cache:
            raw = image[None, 3:4].float() if image.shape[0] == 4 else self.depth_of(image)
            cache["raw"] = raw
            cache["depth"] = depth_conditioning(raw, latent_hw).to(self.device)
        return {"concat": cache["depth"].expand(len(seeds), -1, -1, -1)}


class LatentUpscaleDiffusion(LatentDiffusion):
    """The x4 upscaler: UNet input = [latent (4), low-res image noise-augmented to level L (3)], class label L
    (``hybrid-adm``), v-prediction; the latent has the low-res image's size and the f = 4 VAE decodes it to 4x.

    Each image's augmentation noise is its own draw (the originals draw one ``randn_like`` of the whole batch).
    """

    input_channels = 3
    family = "upscale"

    def __init__(self, *args: Any, low_scale_config: Mapping[str, Any], low_scale_key: str = "LR",
                 noise_level_key: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key
        self.low_scale_model = instantiate_from_config(low_scale_config)
        self.low_scale_model.eval()

    @property
    def max_noise_level(self) -> int:
        return int(self.low_scale_model.max_noise_level)

    def make_conditioner(self, inputs: Any = None):
        from ldm.models.diffusion.concat_conditioners import ConcatConditioner

        return ConcatConditioner(self, inputs)

    def concat_inputs(self, image: torch.Tensor, seeds: Sequence[int], latent_hw: tuple[int, int],
                      cache: dict[str, Any], noise_level: int = 0) -> dict[str, torch.Tensor]:
        """``{"concat": augmented low-res (B, 3, h, w), "vector": levels (B,) int64}``."""
        lr = image[None, :3].float()
        if tuple(lr.shape[-2:]) != tuple(latent_hw):
            raise SdgenError(f"the low-res image is {lr.shape[-1]}x{lr.shape[-2]} but the latent "
                             f"{latent_hw[1]}x{latent_hw[0]}")
        noise = torch.stack([torch.randn(lr.shape[1:], generator=g) for g in make_generators(seeds)])
        x, levels = self.low_scale_model(lr.expand(len(seeds), -1, -1, -1), noise_level, noise=noise)
        return {"concat": x.to(self.device), "vector": levels.to(self.device)}


__all__ = ["LatentFinetuneDiffusion", "LatentInpaintDiffusion", "LatentDepth2ImageDiffusion",
           "LatentUpscaleDiffusion", "binarize_mask"]
