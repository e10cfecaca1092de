"""Conditioners of the models that take an input image besides the prompt (inpainting, depth, x4 upscaling).

- :class:`ConcatConditioner`: the text conditioning plus the model's concatenated inputs
  (:meth:`ldm.models.diffusion.concat_models.LatentFinetuneDiffusion.concat_inputs`): the same tensors in the
  conditional and the unconditional branch, as in the SAI2 scripts (only the text differs between the halves).
- :class:`KnownRegionConditioner` with :class:`KnownRegionDenoiser`: inpainting with a model that has no mask input
  (any SD 1.x / 2.x checkpoint): the known region's latent rides along in the cond dict and the denoiser wrapper
  blends it in at every step, whatever the sampler.

An image's own draws (a posterior sample, noise augmentation) come from :func:`input_noise_seed` of its seed, so it
regenerates alone, in any batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ldm.errors import SdgenError
from ldm.models.diffusion.conditioners import Job, TextConditioner, input_noise_seed
from ldm.modules.distributions import sample_latents
from ldm.sampling.noise import make_generators

KNOWN_KEYS = ("known_latent", "known_keep", "known_noise")


def batch_input(jobs: Sequence[Job]) -> int:
    """The one input image index of a batch (SdgenError when the batch mixes inputs or has none)."""
    inits = {job.init_image for job in jobs}
    if len(inits) != 1 or None in inits:
        raise SdgenError(f"a batch needs one input image for all its jobs, got {sorted(map(str, inits))}")
    return int(inits.pop())


class ConcatConditioner(TextConditioner):
    """Text conditioning plus ``model.concat_inputs`` of the batch's input image in both branches.

    Args:
        model: a model with ``concat_inputs(image, seeds, latent_hw, cache, noise_level)``.
        inputs: :class:`ldm.models.diffusion.conditioners.ConditioningInputs` (``images``: each job's input,
            (C, H, W); ``noise_level``; ``text``).
    """

    def __init__(self, model: Any, inputs: Any) -> None:
        super().__init__(model, getattr(inputs, "text", None))
        self.images = list(getattr(inputs, "images", ()) or ())
        self.noise_level = int(getattr(inputs, "noise_level", 0) or 0)
        self._cache: dict[int, dict[str, Any]] = {}

    def batch_input(self, jobs: Sequence[Job]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any], list[int]]:
        """A batch's input image (C, H, W), its latent size (h, w), its cache (kept across batches) and the seeds of
        the images' own draws (:func:`input_noise_seed`)."""
        init = batch_input(jobs)
        if not 0 <= init < len(self.images):
            raise SdgenError(f"input image {init} is not among the run's {len(self.images)} images")
        image = self.images[init]
        factor = self.model_factor()
        latent_hw = (image.shape[-2] // factor, image.shape[-1] // factor)
        return image, latent_hw, self._cache.setdefault(init, {}), [input_noise_seed(job.seed) for job in jobs]

    def input_of(self, jobs: Sequence[Job]) -> dict[str, torch.Tensor]:
        """The extra network inputs of a batch (the model's ``concat_inputs``)."""
        image, latent_hw, cache, seeds = self.batch_input(jobs)
        return self.model.concat_inputs(image, seeds, latent_hw, cache, self.noise_level)

    def model_factor(self) -> int:
        """Image pixels per latent pixel: the VAE's downsampling (1 for the upscaler, whose latent is the input's
        size)."""
        if hasattr(self.model, "low_scale_model"):
            return 1
        return int(self.model.first_stage_model.factor)

    def __call__(self, jobs: Sequence[Job], with_uncond: bool = True) -> dict[str, dict[str, Any]]:
        cond = super().__call__(jobs, with_uncond)
        extra = self.input_of(jobs)
        for branch in cond.values():
            branch.update(extra)
        return cond


class KnownRegionDenoiser:
    """``D(x, sigma, cond)`` that keeps a known region (inpainting with a model without mask input).

    Before the network: the known region of ``x`` is replaced by the known latent noised to ``sigma``
    (``z0 + sigma * n``, the VE form of the original DDIM sampler's ``img = q_sample(x0, t) * mask + (1 - mask) *
    img``, CV / SAI2 ``ddim.py`` ``p_sample_ddim`` with ``mask`` and ``x0``); after it, the denoised estimate's known
    region is the known latent itself, so every sampler converges to it there. Entries :data:`KNOWN_KEYS` of the
    cond dict: ``known_latent`` (B, C, h, w), ``known_keep`` (B, 1, h, w), 1 = keep, ``known_noise`` (B, C, h, w).
    Without them it is the wrapped denoiser.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor]) -> None:
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        if "known_latent" not in cond:
            return self.denoiser(x, sigma, cond, **kwargs)
        z0 = cond["known_latent"].to(x.dtype)
        keep = cond["known_keep"].to(x.dtype)
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x_in = keep * (z0 + s * cond["known_noise"].to(x.dtype)) + (1 - keep) * x
        rest = {k: v for k, v in cond.items() if k not in KNOWN_KEYS}
        denoised = self.denoiser(x_in, sigma, rest, **kwargs)
        return keep * z0 + (1 - keep) * denoised


class KnownRegionConditioner(ConcatConditioner):
    """Inpainting with an ordinary SD 1.x / 2.x checkpoint: text conditioning plus the known region (the input's
    latent, a posterior sample per image, and the mask resized to the latent with nearest interpolation)."""

    @staticmethod
    def wrap_denoiser(denoiser: Callable[..., torch.Tensor]) -> KnownRegionDenoiser:
        return KnownRegionDenoiser(denoiser)

    def input_of(self, jobs: Sequence[Job]) -> dict[str, torch.Tensor]:
        from ldm.models.diffusion.concat_models import binarize_mask

        image, latent_hw, cache, seeds = self.batch_input(jobs)
        if image.shape[0] != 4:
            raise SdgenError("inpainting needs a mask with the image")
        if "posterior" not in cache:
            cache["posterior"] = self.model.encode_first_stage(image[None, :3].to(self.model.device))
            mask = binarize_mask(image[None, 3:4])
            cache["keep"] = 1.0 - F.interpolate(mask, size=latent_hw).to(self.model.device)
        generators = make_generators(seeds)
        z0 = sample_latents(self.model, cache["posterior"], generators)
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators]).to(z0.device)
        return {"known_latent": z0, "known_keep": cache["keep"].expand(len(jobs), -1, -1, -1).float(),
                "known_noise": noise}


__all__ = ["ConcatConditioner", "KnownRegionConditioner", "KnownRegionDenoiser", "KNOWN_KEYS", "batch_input"]
