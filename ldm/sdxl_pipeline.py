"""SDXL generation: the base alone, the base -> refiner hand-over, and refiner SDEdit of an existing image.

    request -> per batch: [stage: micro-conditioning -> cond/uncond -> CFG(DiscreteDenoiser) -> sampler]+ -> decode

A run is a list of *stages*, each a model with a descending slice of one sigma grid; stage k + 1 starts from
stage k's sampler variable at exactly the sigma where stage k stopped (no re-noising, no decode in between):

- base alone: one stage on the whole grid (SGM demo ``run_txt2img``);
- two-stage ("ensemble of expert denoisers", SDXL model card / diffusers ``denoising_end``): the base runs the
  grid entries whose training timestep is at least ``round(1000 * (1 - high_noise_frac))`` (t >= 200 for 0.8,
  the high-noise part), the refiner, trained on t < 200, the rest down to 0 (:func:`split_sigmas`);
- SDEdit (Meng et al. 2022) on the refiner (or any SDXL model): the init image's latent plus noise at the
  first of the ``int(strength * (steps + 1))`` lowest sigmas of the grid (SGM ``Img2ImgDiscretizationWrapper``,
  the 0.9 demo's "refinement strength" 0.3; :func:`sdedit_sigmas`).

Randomness is that of :mod:`ldm.pipelines`: image i draws its initial noise, its VAE posterior sample and every
later churn / ancestral noise from its own CPU generator seeded ``seed + i``, across both stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from ldm.errors import SdgenError
from ldm.models.diffusion.engine import SDXL_GRIDS, SDXL_SAMPLING_DEFAULTS, DiffusionEngine, MicroConditioning
from ldm.pipelines import (
    GeneratedImage,
    GenerationRequest,
    ImageJob,
    encode_init_image,
    finished_images,
    precision_context,
    sample_init_latents,
)
from ldm.sampling import noise as noise_lib
from ldm.sampling import schedules
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.samplers import SAMPLERS, final_latent, initial_x

logger = logging.getLogger(__name__)

#: SDXL model card / diffusers documentation example: the base takes the noisiest 80 % of the timesteps.
DEFAULT_HIGH_NOISE_FRAC = 0.8
#: SGM 0.9 demo "refinement strength" and diffusers' refiner img2img default.
DEFAULT_REFINE_STRENGTH = 0.3


@dataclass(frozen=True)
class SDXLSettings:
    """The SDXL-specific part of a run (sizes in pixels, height first as in SGM).

    Attributes:
        grid: "sgm" (default; t = linspace(999, 0, S, endpoint=False)) or "sgm_legacy" (0.9 release).
        high_noise_frac: base/refiner split in (0, 1) for the two-stage run; None otherwise.
        original_size, crop_coords, target_size: micro-conditioning of the base (and of a refiner running
            SDEdit alone); None means image size / (0, 0) / image size.
        aesthetic_score, negative_aesthetic_score: the refiner's conditional / unconditional scores.
    """

    grid: str = "sgm"
    high_noise_frac: Optional[float] = None
    original_size: Optional[tuple[int, int]] = None
    crop_coords: Optional[tuple[int, int]] = None
    target_size: Optional[tuple[int, int]] = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def micro(self, height: int, width: int, *, sizes_from_flags: bool = True) -> MicroConditioning:
        """Micro-conditioning for an image of ``height`` x ``width``; ``sizes_from_flags=False`` gives the
        refiner stage of a hand-over the SGM demo's fixed values (image size, crop (0, 0))."""
        if not sizes_from_flags:
            return MicroConditioning.for_image(
                height, width, aesthetic_score=self.aesthetic_score,
                negative_aesthetic_score=self.negative_aesthetic_score,
            )
        return MicroConditioning.for_image(
            height, width, original_size=self.original_size, crop_coords=self.crop_coords,
            target_size=self.target_size, aesthetic_score=self.aesthetic_score,
            negative_aesthetic_score=self.negative_aesthetic_score,
        )


@dataclass
class Stage:
    """One model's share of the run: ``sigmas`` is a descending slice of the grid (its first entry is where
    this stage starts, its last where it hands over, 0 for the last stage)."""

    name: str
    model: DiffusionEngine
    sigmas: torch.Tensor
    micro: MicroConditioning
    guider: Any = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


# ----------------------------------------------------------------------------- grids


def check_high_noise_frac(high_noise_frac: float) -> None:
    if not 0.0 < float(high_noise_frac) < 1.0:
        raise SdgenError(
            f"--high-noise-frac must be strictly between 0 and 1 (the base's share of the noise range), got "
            f"{high_noise_frac}"
        )


def handover_cutoff(high_noise_frac: float, num_timesteps: int = 1000) -> int:
    """First training timestep left to the refiner: the base runs t >= cutoff (diffusers ``denoising_end``:
    ``int(round(N - high_noise_frac * N))``, 200 for 0.8)."""
    check_high_noise_frac(high_noise_frac)
    return int(round(num_timesteps - high_noise_frac * num_timesteps))


def grid_timesteps(sigmas: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Training index of each nonzero grid sigma (nearest table entry, as the denoiser quantises)."""
    s = sigmas[sigmas > 0].to(table.dtype)
    return (s[:, None] - table[None, :].to(s.device)).abs().argmin(dim=1)


def split_sigmas(
    sigmas: torch.Tensor, table: torch.Tensor, high_noise_frac: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a descending grid (ending in 0) between base and refiner at the hand-over sigma.

    The base gets the entries whose timestep is >= :func:`handover_cutoff` plus the next sigma (where it
    stops); the refiner starts at that same sigma: ``base[-1] == refiner[0]``. 50 steps on the "sgm" grid
    with 0.8: the base runs 40 steps, t = 999 ... 219, and hands over at t = 199 (sigma 0.5693); the refiner
    runs the 10 steps t = 199 ... 19 to 0. On the 0.9 grid (t = 981 ... 1): 40 + 10 steps, hand-over at t = 181.

    Raises:
        SdgenError: the split leaves the base or the refiner without a step (too few steps for the fraction).
    """
    cutoff = handover_cutoff(high_noise_frac, len(table))
    t = grid_timesteps(sigmas, table)
    k = int((t >= cutoff).sum())
    steps = len(sigmas) - 1
    if k == 0:
        raise SdgenError(
            f"--high-noise-frac {high_noise_frac} with {steps} steps leaves the base no step (its first timestep "
            f"{int(t[0])} is below the hand-over timestep {cutoff}); raise --high-noise-frac or --steps"
        )
    if k >= steps:
        raise SdgenError(
            f"--high-noise-frac {high_noise_frac} with {steps} steps leaves the refiner no step (every timestep "
            f"is >= the hand-over timestep {cutoff}); lower --high-noise-frac or raise --steps"
        )
    return sigmas[: k + 1], sigmas[k:]


def sdedit_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The SDEdit part of a descending grid: its ``max(int(strength * len(sigmas)), 1)`` lowest entries (SGM
    ``Img2ImgDiscretizationWrapper``). 50 steps, strength 0.3: 15 entries, 14 steps from t = 279 ("sgm") or
    t = 261 ("sgm_legacy").

    Raises:
        SdgenError: strength outside (0, 1], or so low that no step is left.
    """
    if not 0.0 < strength <= 1.0:
        raise SdgenError(f"--strength must be in (0, 1], got {strength}")
    run = schedules.Img2ImgDiscretizationWrapper(lambda: sigmas, strength)()
    if len(run) < 2:
        raise SdgenError(
            f"--strength {strength} with {len(sigmas) - 1} steps leaves no denoising step "
            f"(int(strength * (steps + 1)) must be at least 2); raise --strength or --steps"
        )
    return run


# ----------------------------------------------------------------------------- planning


def plan_stages(
    request: GenerationRequest,
    settings: SDXLSettings,
    base: Optional[DiffusionEngine] = None,
    refiner: Optional[DiffusionEngine] = None,
) -> list[Stage]:
    """The stages of a run (see the module docstring); checks the combination of models and options.

    ``request.init_image`` set: SDEdit on ``refiner`` (or ``base`` when it is the only model) with
    ``request.strength``. Otherwise the base runs alone, or hands over to the refiner at
    ``settings.high_noise_frac`` when both are given.
    """
    if settings.grid not in SDXL_GRIDS:
        raise SdgenError(f"unknown SDXL timestep grid {settings.grid!r} ({', '.join(SDXL_GRIDS)})")
    h, w = request.height, request.width
    if request.init_image is not None:
        model = refiner if refiner is not None else base
        if model is None or (base is not None and refiner is not None):
            raise SdgenError("refining an init image takes exactly one model (the refiner)")
        sigmas = sdedit_sigmas(model.get_sigmas(request.steps, settings.grid), request.strength)
        return [Stage("refiner" if model is refiner else "base", model, sigmas, settings.micro(h, w))]
    if base is None:
        raise SdgenError("without an init image the run needs the base model (--ckpt)")
    sigmas = base.get_sigmas(request.steps, settings.grid)
    if refiner is None:
        if settings.high_noise_frac is not None:
            raise SdgenError("--high-noise-frac needs a refiner checkpoint (--refiner-ckpt)")
        return [Stage("base", base, sigmas, settings.micro(h, w))]
    if settings.high_noise_frac is None:
        raise SdgenError("the base -> refiner hand-over needs --high-noise-frac")
    if not torch.equal(base.denoiser.sigmas.float().cpu(), refiner.denoiser.sigmas.float().cpu()):
        raise SdgenError("the base and the refiner use different noise schedules; they cannot hand over")
    base_sigmas, refiner_sigmas = split_sigmas(sigmas, base.denoiser.sigmas.float().cpu(), settings.high_noise_frac)
    return [
        Stage("base", base, base_sigmas, settings.micro(h, w)),
        Stage("refiner", refiner, refiner_sigmas, settings.micro(h, w, sizes_from_flags=False)),
    ]


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def generate_sdxl(
    request: GenerationRequest,
    settings: SDXLSettings,
    *,
    base: Optional[DiffusionEngine] = None,
    refiner: Optional[DiffusionEngine] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
    on_batch: Optional[Callable[[list[ImageJob]], None]] = None,
    safety_checker: Optional[Any] = None,
) -> Iterator[GeneratedImage]:
    """Run ``request`` on the SDXL models, yielding each image once its batch is decoded.

    ``request.sampler`` is any of :data:`ldm.sampling.samplers.SAMPLERS` (the originals use ``euler``), run on
    the SDXL grid of ``settings.grid`` with the SGM denoiser (sigma quantised to the nearest training step);
    ``request.sampler_options`` go to the sampler (e.g. ``s_churn``). ``request.negative_prompt`` is the
    unconditional prompt (the base ignores an empty one: zero embeddings, see
    :meth:`DiffusionEngine.get_cond_uncond`). With a ``safety_checker`` flagged images come out black
    (:func:`ldm.pipelines.finished_images`).
    """
    if request.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {request.sampler!r} ({', '.join(SAMPLERS)})")
    stages = plan_stages(request, settings, base, refiner)
    for stage in stages:
        stage.guider = CFGDenoiser(stage.model.make_denoiser(), request.scale)
        logger.info("%s: %d steps, sigma %.4f -> %.4f", stage.name, stage.steps,
                    float(stage.sigmas[0]), float(stage.sigmas[-1]))
    first, last = stages[0], stages[-1]
    device = first.model.device
    options = request.sampler_kwargs()
    total = sum(stage.steps for stage in stages)
    shape = request.latent_shape
    posterior = None
    if request.init_image is not None:
        posterior = encode_init_image(first.model, request.init_image, request.precision)

    for jobs in request.jobs():
        if on_batch is not None:
            on_batch(jobs)
        seeds = [job.seed for job in jobs]
        prompts = [job.prompt for job in jobs]
        negatives = [request.negative_prompt] * len(jobs)
        generators = noise_lib.make_generators(seeds)
        noise = noise_lib.initial_noise(shape, seeds, device=device, generators=generators)
        with precision_context(request.precision, device):
            if posterior is None:
                x = initial_x(noise, first.sigmas)
            else:
                z0 = sample_init_latents(first.model, posterior, generators)
                x = schedules.sgm_img2img_start(z0, noise, first.sigmas[0])
            noise_sampler = noise_lib.BatchedNoiseSampler(seeds, shape, device=device, generators=generators)
            done = 0
            for stage in stages:
                cond, uncond = stage.model.get_cond_uncond(prompts, negatives, stage.micro)
                offset = done

                def callback(info: Mapping[str, Any], offset: int = offset) -> None:
                    if on_step is not None:
                        on_step(offset + int(info["i"]) + 1, total)

                x = SAMPLERS[request.sampler](
                    stage.guider, x.to(stage.model.device), stage.sigmas,
                    extra_args={"cond": {"cond": cond, "uncond": uncond}}, callback=callback,
                    noise_sampler=noise_sampler, **options,
                )
                done += stage.steps
            images = last.model.decode_first_stage(final_latent(x, last.sigmas))
        yield from finished_images(images, jobs, safety_checker)


def stage_summary(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """What each stage ran, for the run manifest: steps, start/end sigma and training timesteps."""
    out = []
    for stage in stages:
        t = grid_timesteps(stage.sigmas, stage.model.denoiser.sigmas.float().cpu())
        out.append({
            "stage": stage.name,
            "steps": stage.steps,
            "sigma_start": float(stage.sigmas[0]),
            "sigma_end": float(stage.sigmas[-1]),
            "timesteps": [int(v) for v in t[: stage.steps]],
            "micro_conditioning": stage.micro.as_dict(),
        })
    return out


# ----------------------------------------------------------------------------- configs (before any model is loaded)


def is_sdxl_config(config: Any) -> bool:
    """Whether a loaded config builds a :class:`DiffusionEngine` (its ``model.target``, aliases resolved)."""
    from ldm.util import get_obj_from_str

    try:
        target = config["model"]["target"]
        cls = get_obj_from_str(str(target))
    except (KeyError, TypeError, SdgenError, ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, DiffusionEngine)


def sdxl_sampling_defaults(config: Any) -> dict[str, Any]:
    """The sampling defaults the config's engine will have (:attr:`DiffusionEngine.sampling_defaults`):
    :data:`SDXL_SAMPLING_DEFAULTS` updated with the config's ``model.params.sampling_defaults``."""
    from omegaconf import OmegaConf

    own = config["model"].get("params", {}).get("sampling_defaults", None) or {}
    if OmegaConf.is_config(own):
        own = OmegaConf.to_container(own, resolve=True)
    return {**SDXL_SAMPLING_DEFAULTS, **dict(own)}


def config_sigmas(config: Any, steps: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampling grid (steps + 1,) ending in 0, ascending training sigma table) from an SDXL config's
    discretization, as the loaded engine's :meth:`~DiffusionEngine.get_sigmas` builds them.

    Raises:
        SdgenError: the config has no ``denoiser_config`` (not an SDXL config) or the grid is unknown.
    """
    from ldm.util import instantiate_from_config

    if grid not in SDXL_GRIDS:
        raise SdgenError(f"unknown --grid {grid!r} ({', '.join(SDXL_GRIDS)})")
    try:
        disc_cfg = config["model"]["params"]["denoiser_config"]["params"]["discretization_config"]
    except (KeyError, TypeError) as exc:
        raise SdgenError("the config has no model.params.denoiser_config (not an SDXL config?)") from exc
    params = {**dict(disc_cfg.get("params") or {}), "legacy_range": grid == "sgm_legacy"}
    disc = instantiate_from_config({"target": disc_cfg["target"], "params": params})
    return disc(steps), disc(disc.num_timesteps, do_append_zero=False, flip=True)


def load_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Weights dtype of an SDXL model: float16 under CUDA fp16 autocast (halves memory; the VAE runs in float32),
    bfloat16 for bf16, float32 otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and precision in ("autocast", "fp16"):
        return torch.float16
    return torch.float32
