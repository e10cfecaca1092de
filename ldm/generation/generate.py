"""The generation loop: the one place a sampler from the sampler table runs.

    per batch of jobs: noise from each image's own generator -> [stage: conditioner -> guider(denoiser) ->
    sampler]+ -> decode -> safety checker -> one GeneratedImage per job

The loop knows nothing of model families: each stage brings its model's denoiser and conditioner
(:mod:`ldm.generation.stages`), guidance (CFG, SLD) wraps the stage's denoiser, and the img2img start is a
property of the grid. Randomness is explicit: image i draws its initial noise, its VAE posterior sample
(img2img) and every later churn / ancestral noise from its own CPU generator seeded with its job's seed
(:mod:`ldm.sampling.noise`), across all stages, so it regenerates alone, in any batch, on any device.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.errors import SdgenError
from ldm.generation.images import to_uint8, to_unit_range
from ldm.generation.request import ImageJob, Settings
from ldm.generation.stages import Stage
from ldm.modules.distributions import sample_latents
from ldm.sampling import noise as noise_lib
from ldm.sampling.grids import final_latent, img2img_start, initial_x
from ldm.sampling.guidance import CFGGuidance
from ldm.sampling.samplers import SAMPLERS

PRECISIONS = ("autocast", "full", "bf16", "fp16")

StepCallback = Callable[[int, int], None]
BatchCallback = Callable[[list[ImageJob]], None]


@dataclass
class GeneratedImage:
    """A finished image: its job, its pixels (H, W, 3) uint8, and the safety checker's verdict (None: no checker
    ran; True: flagged, the pixels are black)."""

    job: ImageJob
    pixels: np.ndarray
    flagged: Optional[bool] = None


def precision_context(precision: str, device: torch.device) -> ContextManager[Any]:
    """Autocast for a precision name: autocast = fp16 on CUDA only (the originals), bf16/fp16 anywhere."""
    if precision not in PRECISIONS:
        raise SdgenError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision == "full" or (precision == "autocast" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: Any) -> torch.device:
    """The device of a model: its ``device`` attribute, else that of its first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def encode_init_image(model: Any, image: torch.Tensor, precision: str) -> Any:
    """The VAE posterior of an init image (3, H, W) in [-1, 1], encoded once per run (float32 input)."""
    device = model_device(model)
    with precision_context(precision, device):
        return model.encode_first_stage(image[None].to(device=device, dtype=torch.float32))


def finished_images(
    decoded: torch.Tensor, jobs: Sequence[ImageJob], safety_checker: Optional[Any] = None
) -> Iterator[GeneratedImage]:
    """A decoded batch (B, 3, H, W) in [-1, 1] -> one :class:`GeneratedImage` per job.

    With a ``safety_checker`` (:class:`ldm.safety.checker.SafetyChecker`) flagged images come out black
    (CV txt2img ``check_safety`` on the decoded [0, 1] images, before quantisation).
    """
    x01 = to_unit_range(decoded)
    flagged: list[Optional[bool]] = [None] * len(jobs)
    if safety_checker is not None:
        from ldm.safety.checker import apply_safety_checker

        x01, checked = apply_safety_checker(x01, safety_checker)
        flagged = list(checked)
    for job, pixels, flag in zip(jobs, to_uint8(x01), flagged):
        yield GeneratedImage(job, pixels, flag)


@dataclass
class _Run:
    """What every batch of a run shares: settings, the sampler and its options, guidance, progress."""

    settings: Settings
    device: torch.device
    all_sigmas: list[torch.Tensor]  # every stage's grid (the Brownian noise spans them all)
    guidance: Any
    total: int
    on_step: Optional[StepCallback]

    @property
    def sampler(self) -> Callable[..., torch.Tensor]:
        return SAMPLERS[self.settings.sampler]


@dataclass
class _Batch:
    """One batch in flight: its jobs, the sampler variable, its noise streams, the guider (SLD keeps state across
    stages) and the steps done."""

    jobs: list[ImageJob]
    x: torch.Tensor
    noise_sampler: Any
    guider: Any = None
    done: int = 0


def _run_context(stages_sigmas: list[torch.Tensor], settings: Settings, device: torch.device, guidance: Any,
                 on_step: Optional[StepCallback]) -> _Run:
    if settings.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {settings.sampler!r} ({', '.join(SAMPLERS)})")
    return _Run(settings, device, stages_sigmas, guidance if guidance is not None else CFGGuidance(),
                sum(len(s) - 1 for s in stages_sigmas), on_step)


def _start_batch(run: _Run, first: Stage, jobs: list[ImageJob], start_sigma: Optional[torch.Tensor],
                 init_images: Sequence[torch.Tensor], posteriors: dict[int, Any]) -> _Batch:
    """A batch's starting point: each image's initial noise from its own generator (then, for img2img, its
    posterior sample noised to ``start_sigma``) and its noise streams for the rest of the run."""
    settings, device, shape = run.settings, run.device, run.settings.latent_shape
    seeds = [job.seed for job in jobs]
    generators = noise_lib.make_generators(seeds)
    # image i's first draw is its initial noise (same for txt2img and img2img), then its posterior sample
    noise = noise_lib.initial_noise(shape, seeds, device=device, generators=generators)
    posterior = None
    if start_sigma is not None:
        init = _batch_init_image(jobs)
        if init not in posteriors:
            # the RGB channels start the latent; an input's extra channel (a depth map) is for its conditioner
            image = _checked(init_images[init][:3], settings)
            posteriors[init] = encode_init_image(first.model, image, settings.precision)
        posterior = posteriors[init]
    with precision_context(settings.precision, device):
        if posterior is None:
            x = initial_x(noise, first.sigmas)
        else:
            z0 = sample_latents(first.model, posterior, generators)
            x = img2img_start(settings.grid, z0, noise, start_sigma, first.sigmas)
        noise_sampler = noise_lib.noise_sampler_for(settings.sampler, seeds, shape, run.all_sigmas, device,
                                                    torch.float32, generators)
    return _Batch(jobs, x, noise_sampler)


def _run_stage(run: _Run, stage: Stage, batch: _Batch) -> None:
    """One stage of one batch: conditioning, the guider around the stage's denoiser, and the sampler (the one
    call of a sampler from the sampler table in sdgen)."""
    settings = run.settings
    with precision_context(settings.precision, run.device):
        cond = stage.conditioner(batch.jobs, with_uncond=settings.scale != 1.0)
        batch.guider = run.guidance.guider(stage.denoiser, settings.scale, previous=batch.guider)
        cond.update(run.guidance.extra_cond(partial(stage.conditioner.encode, like=cond["cond"]), len(batch.jobs),
                                            settings.scale))
        batch.x = run.sampler(batch.guider, batch.x.to(model_device(stage.model)), stage.sigmas,
                              extra_args={"cond": cond},
                              callback=_step_callback(batch.guider, batch.done, run.total, run.on_step),
                              noise_sampler=batch.noise_sampler, **settings.sampler_kwargs())
    batch.done += stage.steps


def _finish_batch(run: _Run, last: Stage, batch: _Batch, safety_checker: Optional[Any]) -> Iterator[GeneratedImage]:
    with precision_context(run.settings.precision, run.device):
        images = last.model.decode_first_stage(final_latent(batch.x, last.sigmas))
    yield from finished_images(images, batch.jobs, safety_checker)


@torch.no_grad()
def generate(
    stages: Sequence[Stage],
    batches: Iterable[Sequence[ImageJob]],
    settings: Settings,
    *,
    start_sigma: Optional[torch.Tensor] = None,
    init_images: Sequence[torch.Tensor] = (),
    guidance: Any = None,
    on_step: Optional[StepCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    safety_checker: Optional[Any] = None,
) -> Iterator[GeneratedImage]:
    """Run ``batches`` of jobs through ``stages``, yielding each image once its batch is decoded.

    Args:
        stages: from :func:`ldm.generation.stages.build_stages`; the first stage's model encodes the init
            image, the last one's decodes.
        settings: the batches' sampling settings (sampler, scale, precision, latent shape ...).
        start_sigma: img2img / SDEdit: the noise level of the init latent (the job's ``init_image`` in
            ``init_images``, each (3, H, W) in [-1, 1]); None starts from pure noise.
        guidance: :class:`ldm.sampling.guidance.CFGGuidance` (default) or
            :class:`ldm.sampling.sld.SLDGuidance`; its guider wraps each stage's denoiser.
        on_step: called as ``on_step(done, total)`` after each sampler step of a batch (all stages counted).
        on_batch: called with the batch's jobs before it starts.
        safety_checker: flagged images come out black (:func:`finished_images`).
    """
    first, last = stages[0], stages[-1]
    run = _run_context([s.sigmas for s in stages], settings, model_device(first.model), guidance, on_step)
    posteriors: dict[int, Any] = {}
    for jobs in batches:
        jobs = list(jobs)
        if on_batch is not None:
            on_batch(jobs)
        batch = _start_batch(run, first, jobs, start_sigma, init_images, posteriors)
        for stage in stages:
            _run_stage(run, stage, batch)
        yield from _finish_batch(run, last, batch, safety_checker)


@torch.no_grad()
def generate_model_by_model(
    stage_loaders: Sequence[Callable[[], Stage]],
    stages_sigmas: list[torch.Tensor],
    batches: Iterable[Sequence[ImageJob]],
    settings: Settings,
    *,
    guidance: Any = None,
    on_step: Optional[StepCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    safety_checker: Optional[Any] = None,
) -> Iterator[GeneratedImage]:
    """:func:`generate` for runs from noise (an SDXL base -> refiner hand-over) with one model in memory at a
    time: each loader builds its stage (loading its model), every batch runs that stage, and the stage is
    dropped before the next is loaded. The batches wait between stages as their sampler variable and noise
    streams, so the images are those of :func:`generate`, bit for bit; they come out when the last stage ends.

    ``stages_sigmas`` are the stages' grids (known before any model is loaded), for the noise streams.
    """
    batches = [list(jobs) for jobs in batches]
    run, waiting = None, []
    for k, load in enumerate(stage_loaders):
        stage = load()
        if run is None:
            run = _run_context(stages_sigmas, settings, model_device(stage.model), guidance, on_step)
            waiting = [_start_batch(run, stage, jobs, None, (), {}) for jobs in batches]
        for batch in waiting:
            if on_batch is not None:
                on_batch(batch.jobs)
            _run_stage(run, stage, batch)
            if k == len(stage_loaders) - 1:
                yield from _finish_batch(run, stage, batch, safety_checker)
            else:  # keep the guider's state (SLD's step and momentum), not its hold on the model
                batch.guider.denoiser = None
                if hasattr(batch.guider, "fallback"):
                    batch.guider.fallback = None
        del stage  # the next model loads only once this one can be freed
        gc.collect()


def _step_callback(guider: Any, offset: int, total: int, on_step: Optional[StepCallback]):
    """The sampler callback of one stage: the guider's step bookkeeping (SLD) and the progress report, with the
    step index counted over the whole run (``offset`` steps of earlier stages)."""
    step_end = getattr(guider, "on_step_end", None)

    def callback(info: Mapping[str, Any]) -> None:
        done = offset + int(info["i"]) + 1
        if step_end is not None:
            step_end({**info, "i": done - 1})
        if on_step is not None:
            on_step(done, total)

    return callback


def _batch_init_image(jobs: Sequence[ImageJob]) -> int:
    inits = {job.init_image for job in jobs}
    if len(inits) != 1 or None in inits:
        raise SdgenError(f"an img2img batch needs one init image for all its jobs, got {sorted(map(str, inits))}")
    return int(inits.pop())


def _checked(image: torch.Tensor, settings: Settings) -> torch.Tensor:
    if tuple(image.shape[-2:]) != (settings.height, settings.width):
        raise SdgenError(f"the init image is {image.shape[-1]}x{image.shape[-2]} but the run asks for "
                         f"{settings.width}x{settings.height}")
    return image
