"""Conditioners: a batch of image jobs -> the guider's network inputs ``{"cond": dict, "uncond": dict}``.

Each model builds its own (``model.make_conditioner(inputs)``), so the generation loop never asks which family it
runs. A job is anything with ``prompt``, ``negative_prompt``, ``seed`` and ``init_image`` (the index of its init
image); a cond dict holds the network inputs (``{"crossattn": (B, L, D), "vector": (B, A), ...}``).

- :class:`TextConditioner` (SD 1.x / 2.x): the prompt through the text encoder; the unconditional branch of
  classifier-free guidance encodes the negative prompt ("" as in the originals).
- :class:`SDXLConditioner`: the SGM demo's cond / uncond with the size, crop and aesthetic micro-conditioning
  (:meth:`ldm.models.diffusion.engine.DiffusionEngine.get_cond_uncond`).
- :class:`ImageVariationConditioning` (Stable unCLIP): the text conditioning plus the ADM input, the job's init
  image embedding noise-augmented per image on the conditional branch and zeros on the unconditional one.
- :class:`PriorConditioning` (Stable unCLIP-L text-to-image): the same, with the image embedding made from the
  job's prompt by the Karlo prior (:mod:`ldm.models.prior`), from the job's own prior noise stream.

``encode(prompts, like=cond)`` gives the cond dict of a list of prompts on the conditional branch, with the
non-text inputs of ``like`` (a batch's conditional cond dict): what a guidance method encodes its extra prompts
with (the SLD safety concept, which must see the same image embedding or micro-conditioning as the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

import torch

from ldm.errors import SdgenError


class Job(Protocol):
    prompt: str
    negative_prompt: str
    seed: int
    init_image: int | None


@dataclass(frozen=True)
class ConditioningInputs:
    """What a model's conditioner may need besides the prompts; each model takes what it uses.

    Attributes:
        micro: SDXL micro-conditioning (:class:`ldm.models.diffusion.engine.MicroConditioning`).
        text: how prompts are encoded (:class:`ldm.modules.encoders.prompts.TextOptions`; None: the original
            scripts' conditioning).
        images: init images (3, H, W) in [-1, 1] an image-variation model embeds (by the jobs' ``init_image``).
        noise_level: the unCLIP noise augmentation level of the image embeddings.
        task: "inpaint" when the images' 4th channel is a mask to repaint (a model without a mask input then blends
            the known region in at each step), else None.
        prior: the loaded Karlo prior (:class:`ldm.models.prior.karlo.KarloPrior`) of unCLIP-L text-to-image, with
            its respaced ``prior_steps`` and guidance ``prior_scale``.
    """

    micro: Any = None
    images: Sequence[torch.Tensor] = field(default_factory=tuple)
    noise_level: int = 0
    text: Any = None
    prior: Any = None
    prior_steps: Optional[int] = None
    prior_scale: Optional[float] = None
    task: Optional[str] = None


def _chunks_of(like: Optional[Mapping[str, Any]]) -> int:
    """How many 77-token chunks a cond dict's text context has (1 without one)."""
    context = (like or {}).get("crossattn")
    return max(1, int(context.shape[1]) // 77) if context is not None else 1


def _same_length(cond: Mapping[str, Any], like: Optional[Mapping[str, Any]], what: str) -> None:
    if like is not None and "crossattn" in like and cond["crossattn"].shape[1] != like["crossattn"].shape[1]:
        raise SdgenError(f"{what} needs {cond['crossattn'].shape[1] // 77} chunks of 77 tokens, the prompt "
                         f"{like['crossattn'].shape[1] // 77}: shorten it or lengthen the prompt")


class TextConditioner:
    """SD 1.x / 2.x text conditioning through ``model.get_learned_conditioning`` (cond key "crossattn"); a batch's
    prompts and negative prompts get the same number of 77-token chunks (A1111)."""

    def __init__(self, model: Any, options: Any = None) -> None:
        self.model = model
        self.options = options

    def encode(self, prompts: Sequence[str], like: Optional[Mapping[str, Any]] = None,
               min_chunks: int = 1) -> dict[str, Any]:
        """Prompts -> ``{"crossattn": (len(prompts), 77 k, D)}`` with as many chunks as ``like``'s context;
        ``like``'s other entries (an ADM "vector") are carried over."""
        cond = {k: v for k, v in (like or {}).items() if k != "crossattn"}
        if self.options is None:
            cond["crossattn"] = self.model.get_learned_conditioning(list(prompts))
        else:
            chunks = max(min_chunks, _chunks_of(like))
            cond["crossattn"] = self.model.get_learned_conditioning(list(prompts), self.options, chunks)
        _same_length(cond, like, "the extra prompt (the SLD safety concept)")
        return cond

    def __call__(self, jobs: Sequence[Job], with_uncond: bool = True) -> dict[str, dict[str, Any]]:
        """``{"cond": ..., "uncond": ...}`` of a batch; "uncond" only ``with_uncond`` (guidance scale != 1)."""
        prompts = [job.prompt for job in jobs]
        negatives = [job.negative_prompt for job in jobs] if with_uncond else []
        chunks = self.model.count_chunks(prompts + negatives, self.options) if self.options is not None else 1
        cond = {"cond": self.encode(prompts, min_chunks=chunks)}
        if with_uncond:
            cond["uncond"] = self.encode(negatives, min_chunks=chunks)
        return cond


class SDXLConditioner:
    """SDXL conditioning of one stage: text plus the stage's micro-conditioning (SGM demo ``get_batch``)."""

    def __init__(self, model: Any, micro: Any, options: Any = None) -> None:
        if micro is None:
            raise SdgenError("the SDXL conditioner needs the micro-conditioning (sizes, crop, aesthetic score)")
        self.model = model
        self.micro = micro
        self.options = options

    def encode(self, prompts: Sequence[str], like: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """Prompts -> the conditional branch's ``{"crossattn": (B, 77, D), "vector": (B, A)}`` with this stage's
        micro-conditioning (the pooled text is part of the vector), as many chunks as ``like``'s context."""
        batch = self.model.conditioning_batch(list(prompts), self.micro, options=self.options,
                                              min_chunks=_chunks_of(like))
        cond = self.model.conditioner(batch)
        _same_length(cond, like, "the extra prompt (the SLD safety concept)")
        return cond

    def __call__(self, jobs: Sequence[Job], with_uncond: bool = True) -> dict[str, dict[str, Any]]:
        cond, uncond = self.model.get_cond_uncond([job.prompt for job in jobs],
                                                  [job.negative_prompt for job in jobs], self.micro, self.options)
        return {"cond": cond, "uncond": uncond} if with_uncond else {"cond": cond}


# splitmix64 increment: the embedding noise of an image comes from its own stream, distinct from its latent's
_EMBEDDING_STREAM = 0x9E3779B97F4A7C15


def embedding_noise_seed(seed: int) -> int:
    """Seed of the generator an image's noise augmentation draws from: a fixed function of the image's seed.

    The image's initial latent noise keeps the generator seeded ``seed`` (as in txt2img), so the two draws
    are independent and both reproducible per image, in any batch.
    """
    return (int(seed) + _EMBEDDING_STREAM) % (1 << 64)


def prior_noise_seed(seed: int) -> int:
    """Seed of the generator an image's Karlo prior draws its noise from (initial state, then one draw per step):
    a third stream of the image's seed, apart from its latent's and its embedding augmentation's."""
    return (int(seed) + 2 * _EMBEDDING_STREAM) % (1 << 64)


def input_noise_seed(seed: int) -> int:
    """Seed of the generator an image's input conditioning draws from (the inpainting masked-image posterior
    sample, the upscaler's low-res noise augmentation, the known region's noise): a fourth stream of its seed."""
    return (int(seed) + 3 * _EMBEDDING_STREAM) % (1 << 64)


class ImageVariationConditioning(TextConditioner):
    """The conditioner of an image-variation run (Stable unCLIP).

    Each batch gets the text conditioning of :class:`TextConditioner` plus the ADM ("vector") input: the batch's
    init-image embedding (``jobs[i].init_image``, the same for the whole batch), noise-augmented per image with
    one draw from :func:`embedding_noise_seed` of the image's seed, on the conditional branch, and an all-zero
    vector on the unconditional one (SAI2 ``scripts/streamlit/stableunclip.py``).

    Args:
        model: the unCLIP model (:class:`ldm.models.diffusion.unclip.ImageEmbeddingConditionedLatentDiffusion`).
        images: init images, each (3, H, W) in [-1, 1]; embedded once here.
        noise_level: 0 .. ``model.max_noise_level - 1``.
    """

    def __init__(self, model: Any, images: Sequence[torch.Tensor], noise_level: int, options: Any = None) -> None:
        super().__init__(model, options)
        if not images:
            raise SdgenError("image variations need at least one init image")
        if not 0 <= int(noise_level) < model.max_noise_level:
            raise SdgenError(f"noise level must be in 0..{model.max_noise_level - 1}, got {noise_level}")
        self.noise_level = int(noise_level)
        self.embeddings = [model.embed_images(image[None]) for image in images]

    def adm_vectors(self, jobs: Sequence[Job]) -> torch.Tensor:
        """The ADM vectors (len(jobs), 2D) of a batch: its init image's embedding, noise-augmented per image."""
        images = {job.init_image for job in jobs}
        if len(images) != 1 or None in images:
            raise SdgenError(f"a batch of image variations needs one init image per batch, got {sorted(images)}")
        embedding = self.embeddings[int(images.pop())].expand(len(jobs), -1)
        noise = torch.stack([
            torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(embedding_noise_seed(job.seed)))
            for job in jobs
        ])
        return self.model.augment_embedding(embedding, self.noise_level, noise=noise)

    def __call__(self, jobs: Sequence[Job], with_uncond: bool = True) -> dict[str, dict[str, Any]]:
        cond = super().__call__(jobs, with_uncond)
        adm = self.adm_vectors(jobs)
        cond["cond"]["vector"] = adm
        if "uncond" in cond:
            cond["uncond"]["vector"] = self.model.unconditional_adm(adm)
        return cond


class PriorConditioning(ImageVariationConditioning):
    """The conditioner of Stable unCLIP-L text-to-image (SAI2 ``stableunclip.py`` with "Use KARLO prior"): the
    prompt through the Karlo prior gives each image its CLIP image embedding, which is noise-augmented and fed as
    the ADM input like an init image's; the prompt is also the decoder's cross-attention text.

    Image k's prior noise comes from :func:`prior_noise_seed` of its seed, so it regenerates alone, in any batch.
    (The original draws the prior's noise for the whole batch from one global CUDA generator and reuses the same
    embeddings for every row of a grid; neither can be reproduced per image.)
    """

    def __init__(self, model: Any, prior: Any, steps: int, scale: float, noise_level: int,
                 options: Any = None) -> None:
        TextConditioner.__init__(self, model, options)
        if not 0 <= int(noise_level) < model.max_noise_level:
            raise SdgenError(f"noise level must be in 0..{model.max_noise_level - 1}, got {noise_level}")
        self.noise_level = int(noise_level)
        self.prior, self.steps, self.scale = prior, int(steps), float(scale)
        self._prefixes: dict[str, Any] = {}

    def _prefix(self, prompts: Sequence[str]) -> Any:
        """The prior's text prefixes of ``prompts`` (each prompt's computed once per run)."""
        from ldm.models.prior.text import encode_text, karlo_tokens

        new = [p for p in dict.fromkeys(prompts) if p not in self._prefixes]
        if new:
            ids, mask = karlo_tokens(new)
            pooled, states = encode_text(self.model.embedder.model, ids)
            device = next(self.prior.parameters()).device
            prefix = self.prior.model.encode_text(pooled.to(device), states.to(device), mask.to(device))
            for row, prompt in enumerate(new):
                self._prefixes[prompt] = prefix.select(torch.tensor([row], device=device))
        from ldm.models.prior.transformer import TextPrefix

        parts = [self._prefixes[p] for p in prompts]
        return TextPrefix(*(torch.cat([getattr(p, f) for p in parts]) for f in ("keys", "values", "visible")))

    @torch.no_grad()
    def embeddings(self, jobs: Sequence[Job]) -> torch.Tensor:
        """The CLIP image embeddings (len(jobs), D) the prior makes from the jobs' prompts (de-normalised)."""
        from ldm.models.prior.karlo import denormalize, sample_prior
        from ldm.sampling.noise import BatchedNoiseSampler, initial_noise, make_generators

        seeds = [prior_noise_seed(job.seed) for job in jobs]
        generators = make_generators(seeds)  # drawn on the CPU, moved to the prior's device
        shape, device = (self.prior.clip_dim,), next(self.prior.parameters()).device
        noise = initial_noise(shape, seeds, device=device, generators=generators)
        sampler = BatchedNoiseSampler(seeds, shape, device=device, generators=generators)
        x = sample_prior(self.prior, self._prefix([job.prompt for job in jobs]), self._prefix([""] * len(jobs)),
                         noise, steps=self.steps, scale=self.scale, noise_sampler=sampler)
        aug = self.model.noise_augmentor
        return denormalize(x, aug.data_mean, aug.data_std)

    def adm_vectors(self, jobs: Sequence[Job]) -> torch.Tensor:
        """The ADM vectors (len(jobs), 2D): each job's prior embedding, noise-augmented with its own draw."""
        embedding = self.embeddings(jobs).to(self.model.device)
        noise = torch.stack([
            torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(embedding_noise_seed(job.seed)))
            for job in jobs
        ])
        return self.model.augment_embedding(embedding, self.noise_level, noise=noise)
