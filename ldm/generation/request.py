"""What a run generates: the sampling settings and the ordered list of image jobs.

A run is an ordered list of :class:`ImageJob` s, each with its global index, seed, prompt, negative prompt and
init image, grouped into batches of jobs that share one :class:`Settings` value. Image k's pixels depend only on
its job and its batch's settings: its noise comes from its own generator (``seed``), so any subset of batches can
run anywhere and give the same pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from ldm.defaults import FAMILY_DEFAULTS
from ldm.errors import SdgenError

SDXL_DEFAULTS = FAMILY_DEFAULTS["txt2img"]["sdxl"]


@dataclass(frozen=True)
class Settings:
    """Everything about how a batch is sampled, besides its prompts and seeds.

    Attributes:
        sampler: a key of :data:`ldm.sampling.samplers.SAMPLERS`; ``steps`` its number of steps.
        grid: the sigma grid (:data:`ldm.sampling.grids.GRIDS`): the sampler's original grid for SD 1.x / 2.x,
            "sgm" or "sgm_legacy" for SDXL.
        scale: classifier-free guidance scale (1.0: no unconditional pass); ``eta``: DDIM eta (DDIM/PLMS only).
        height, width: image size in pixels; ``factor`` the VAE downsampling, ``latent_channels`` C.
        precision: autocast (fp16 autocast on CUDA, fp32 elsewhere), full, bf16 or fp16.
        strength: img2img / SDEdit strength in (0, 1], None when the run starts from pure noise.
        high_noise_frac: the base's share of the noise range in a base -> refiner run, else None.
        s_churn, s_tmin, s_tmax, s_noise: Euler / Heun churn (Karras et al. 2022, alg. 2).
        noise_level: noise augmentation of unCLIP image embeddings.
        original_size, crop_coords, target_size, aesthetic_score, negative_aesthetic_score: SDXL
            micro-conditioning (None: the image size / (0, 0) / the image size).
        sld: Safe Latent Diffusion settings (:func:`ldm.sld_config.options_record`), None for plain CFG.
        prompt_syntax: "a1111" (weights, BREAK, long prompts) or "original" (the scripts' text, cut at 77).
        clip_skip: A1111's clip skip (1: the text encoders' usual output layer).
        schedule: A1111's "Schedule type" (default, karras, exponential, sgm_uniform) that chose ``grid``.
        prior_steps, prior_scale: the Karlo prior's respaced steps and guidance scale (unCLIP-L text-to-image),
            None without a prior.
        engine: how the networks run, "torch" or "openvino" (:mod:`ldm.engines`): it changes the last bits.
        tile: the denoiser runs on overlapping latent tiles blended at every step (``upscale --tile``,
            :class:`ldm.sampling.tiled.TiledDenoiser`).
    """

    sampler: str
    steps: int
    grid: str
    scale: float
    height: int
    width: int
    factor: int = 8
    latent_channels: int = 4
    precision: str = "autocast"
    eta: float = 0.0
    strength: Optional[float] = None
    high_noise_frac: Optional[float] = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    noise_level: int = 0
    original_size: Optional[tuple[int, int]] = None
    crop_coords: Optional[tuple[int, int]] = None
    target_size: Optional[tuple[int, int]] = None
    aesthetic_score: float = SDXL_DEFAULTS["aesthetic_score"]
    negative_aesthetic_score: float = SDXL_DEFAULTS["negative_aesthetic_score"]
    sld: Optional[dict[str, Any]] = field(default=None, hash=False)
    prompt_syntax: str = "a1111"
    clip_skip: int = 1
    schedule: str = "default"
    prior_steps: Optional[int] = None
    prior_scale: Optional[float] = None
    tile: bool = False
    engine: str = "torch"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-image latent shape (C, H / f, W / f)."""
        return (self.latent_channels, self.height // self.factor, self.width // self.factor)

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the sampler: ``eta`` for DDIM / PLMS, the churn settings for Euler / Heun."""
        if self.sampler in ("ddim", "plms"):
            return {"eta": self.eta}
        if self.sampler in ("euler", "heun"):
            return {"s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax, "s_noise": self.s_noise}
        return {}

    def record(self) -> dict[str, Any]:
        """Plain JSON data for the run manifest (an unbounded ``s_tmax`` as the string "inf")."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return list(v)
            return "inf" if isinstance(v, float) and v == float("inf") else v

        return {k: plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: its global index, seed, prompts, init image (an index into the run's init images, or
    None), its slot in the batch it is generated in, its sampling settings (the same for the whole batch), its
    sweep cell (``((field, value), ...)``, empty without ``--sweep``) and where its prompt came from."""

    index: int
    seed: int
    prompt: str
    negative_prompt: str = ""
    init_image: Optional[int] = None
    batch: int = 0
    position: int = 0
    settings: Optional[Settings] = field(default=None, compare=False)
    cell: tuple = ()
    where: str = ""

    def key(self, models: Sequence[str] = (), init_sha256: Optional[str] = None) -> dict[str, Any]:
        """Everything that decides this image's pixels (what a resumed run must find unchanged): prompts, seed,
        settings, the models' and the init image's sha256."""
        return {"index": self.index, "seed": self.seed, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "settings": self.settings.record() if self.settings is not None else None, "models": list(models),
                "init_image": init_sha256}


def prompt_batches(prompts: Sequence[str], batch_size: int, per_image: bool) -> list[list[str]]:
    """The prompts of each batch of one iteration (CV scripts/txt2img.py).

    ``per_image=False``: one prompt, ``batch_size`` copies in one batch. ``per_image=True`` (--from-file):
    each prompt is one image, chunked into batches of ``batch_size`` (the last may be smaller).
    """
    if not prompts:
        raise SdgenError("no prompts to render")
    if not per_image:
        return [[prompts[0]] * batch_size]
    return [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]


def make_jobs(
    batches: Sequence[Sequence[str]],
    n_iter: int,
    seed: int,
    *,
    negative_prompt: str = "",
    fixed_code: bool = False,
    init_images: Sequence[Optional[int]] | None = None,
) -> list[list[ImageJob]]:
    """Every batch of a run, in order: the prompt batches of one iteration, repeated ``n_iter`` times.

    Image i of the run has seed ``seed + i``; with ``fixed_code`` image k of every batch has ``seed + k`` (CV
    ``--fixed_code``). ``init_images[b]`` is the init image of prompt batch b (None: no init image).
    """
    if init_images is not None and len(init_images) != len(batches):
        raise ValueError(f"{len(batches)} prompt batches but {len(init_images)} init-image entries")
    out: list[list[ImageJob]] = []
    index = 0
    for _ in range(n_iter):
        for b, prompts in enumerate(batches):
            batch = []
            init = init_images[b] if init_images is not None else None
            for position, prompt in enumerate(prompts):
                job_seed = seed + (position if fixed_code else index)
                batch.append(ImageJob(index, job_seed, prompt, negative_prompt, init, len(out), position))
                index += 1
            out.append(batch)
    return out
