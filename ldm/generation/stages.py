"""A run as a list of stages, each (model, denoiser, conditioner, descending slice of one sigma grid).

- SD 1.x, SD 2.x, unCLIP and the SDXL base alone: one stage on the whole grid.
- img2img / SDEdit: one stage on the truncated grid (:func:`ldm.sampling.grids.img2img_sigmas`); the init
  latent is noised to :attr:`RunGrids.start_sigma`.
- SDXL base -> refiner ("ensemble of expert denoisers", SDXL model card): two stages splitting one grid at the
  hand-over sigma (:func:`ldm.sampling.grids.split_sigmas`); the refiner starts from the base's sampler variable
  at exactly the sigma where the base stopped (no re-noising, no decode in between).

Each model builds its own denoiser and conditioner (``make_denoiser(grid)``, ``make_conditioner(inputs)``), so
nothing here or in the generation loop asks which family it runs. :func:`plan_grids` needs only a training
schedule, so a run plan checks its step counts, strength and split before any model is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.errors import SdgenError
from ldm.generation.request import Settings
from ldm.models.diffusion.conditioners import ConditioningInputs
from ldm.modules.encoders.prompts import TextOptions
from ldm.sampling import grids, schedules

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One model's share of a run: ``sigmas`` is a descending slice of the grid (its first entry is where this
    stage starts, its last where it hands over, the grid's end for the last stage)."""

    name: str
    model: Any
    denoiser: Callable[..., torch.Tensor]
    conditioner: Any
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class RunGrids:
    """The sigmas of each stage (``(name, sigmas)`` in order) and, for img2img / SDEdit, the noise level the
    init latent is brought to (None: the run starts from pure noise at the top of the grid)."""

    stages: tuple[tuple[str, torch.Tensor], ...]
    start_sigma: Optional[torch.Tensor] = None


def timestep_table(alphas_cumprod) -> torch.Tensor:
    """The ascending float32 training sigma table (N,) in SGM's operation order (its ``denoiser.sigmas``)."""
    return schedules.sgm_sigmas(alphas_cumprod, np.arange(len(alphas_cumprod)))


def plan_grids(settings: Settings, alphas_cumprod, roles: Sequence[str]) -> RunGrids:
    """The stage grids of a run of ``roles`` (one model: ``("base",)`` ...; two: ``("base", "refiner")``) on a
    training alphabar (raises SdgenError for a step count, strength or split the grid refuses)."""
    full = grids.grid_sigmas(settings.grid, alphas_cumprod, settings.steps)
    if len(roles) == 1:
        if settings.strength is None:
            return RunGrids(((roles[0], full),))
        start, run = grids.img2img_sigmas(settings.grid, full, settings.strength, settings.steps)
        return RunGrids(((roles[0], run),), start)
    if len(roles) != 2 or settings.high_noise_frac is None or settings.strength is not None:
        raise SdgenError("a base -> refiner run takes two models, --high-noise-frac and no init image")
    base, refiner = grids.split_sigmas(full, timestep_table(alphas_cumprod), settings.high_noise_frac)
    return RunGrids(((roles[0], base), (roles[1], refiner)))


def depth_full_sample(run_grids: RunGrids, settings: Settings) -> RunGrids:
    """SAI2 ``scripts/gradio/depth2img.py`` l.127-137: ``t_enc = min(int(strength * steps), steps - 1)``, and at
    strength 1.0 (``do_full_sample``) the start is pure noise, still decoded from grid point ``t_enc - 1``: one step
    fewer than the grid (49 of 50). An infinite start sigma makes :func:`ldm.sampling.grids.img2img_start` return
    exactly the image's noise (sqrt(0) z0 + sqrt(1) noise)."""
    if settings.grid != "ddim" or settings.strength is None or settings.strength < 1.0:
        return run_grids
    (role, sigmas), = run_grids.stages
    return RunGrids(((role, sigmas[1:]),), torch.tensor(float("inf"), dtype=sigmas.dtype))


def micro_conditioning(settings: Settings, role: str, two_stage: bool):
    """The SDXL micro-conditioning of a stage: the flags' sizes, crop and scores; the refiner of a base ->
    refiner run gets the SGM demo's fixed values (image size, crop (0, 0)) with the aesthetic scores."""
    from ldm.models.diffusion.engine import MicroConditioning

    h, w = settings.height, settings.width
    if two_stage and role == "refiner":
        return MicroConditioning.for_image(h, w, aesthetic_score=settings.aesthetic_score,
                                           negative_aesthetic_score=settings.negative_aesthetic_score)
    return MicroConditioning.for_image(h, w, original_size=settings.original_size, crop_coords=settings.crop_coords,
                                       target_size=settings.target_size, aesthetic_score=settings.aesthetic_score,
                                       negative_aesthetic_score=settings.negative_aesthetic_score)


def build_stages(
    models: Sequence[tuple[str, Any]], settings: Settings, images: Sequence[torch.Tensor] = (),
    embeddings: Sequence[str] = (), prior: Any = None, task: Optional[str] = None,
) -> tuple[list[Stage], Optional[torch.Tensor]]:
    """The stages of a run of the loaded ``models`` (``(role, model)`` in order) and the img2img start sigma.

    ``images`` are the run's init images (C, H, W), RGB in [-1, 1] first, for conditioners that take them (unCLIP's
    embedding, the concatenated inputs of inpainting, depth and upscaling); ``task`` "inpaint" when their 4th
    channel is a mask to repaint;
    ``embeddings`` the trigger words of the textual-inversion embeddings registered in the models; ``prior`` the
    loaded Karlo prior of an unCLIP-L text-to-image run (a conditioning step of its conditioner).
    """
    alphas = models[0][1].alphas_cumprod
    for role, model in models[1:]:
        if not torch.equal(torch.as_tensor(model.alphas_cumprod).double().cpu(), torch.as_tensor(alphas).double().cpu()):
            raise SdgenError(f"the {models[0][0]} and the {role} use different noise schedules; they cannot hand over")
    run_grids = plan_grids(settings, alphas, [role for role, _ in models])
    if task == "depth2img":
        run_grids = depth_full_sample(run_grids, settings)
    two_stage = len(models) == 2
    stages = [make_stage(role, model, sigmas, settings, images, embeddings, two_stage, prior, task)
              for (role, model), (_, sigmas) in zip(models, run_grids.stages)]
    return stages, run_grids.start_sigma


def make_stage(role: str, model: Any, sigmas: torch.Tensor, settings: Settings, images: Sequence[torch.Tensor] = (),
               embeddings: Sequence[str] = (), two_stage: bool = False, prior: Any = None,
               task: Optional[str] = None) -> Stage:
    """One stage: ``model``'s denoiser and conditioner (with the stage's micro-conditioning) on ``sigmas``; a
    conditioner that must see every denoiser call (``wrap_denoiser``: the known region of inpainting with an
    ordinary model) wraps the denoiser. With ``settings.tile`` the network's denoiser runs on overlapping latent
    tiles (:class:`ldm.sampling.tiled.TiledDenoiser`; under the guider, which the generation loop adds)."""
    text = TextOptions(settings.prompt_syntax, settings.clip_skip, tuple(embeddings))
    device = getattr(model, "device", None)
    inputs = ConditioningInputs(micro=micro_conditioning(settings, role, two_stage),
                                images=[t.to(device) for t in images], noise_level=settings.noise_level, text=text,
                                prior=prior, prior_steps=settings.prior_steps, prior_scale=settings.prior_scale,
                                task=task)
    conditioner = model.make_conditioner(inputs)
    denoiser = model.make_denoiser(settings.grid)
    if settings.tile:
        from ldm.sampling.tiled import TiledDenoiser

        denoiser = TiledDenoiser(denoiser)
    wrap = getattr(conditioner, "wrap_denoiser", None)
    stage = Stage(role, model, wrap(denoiser) if wrap is not None else denoiser, conditioner, sigmas)
    logger.info("%s: %d steps, sigma %.4f -> %.4f", role, stage.steps, float(sigmas[0]), float(sigmas[-1]))
    return stage


def stage_summary(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """What each stage ran, for the run manifest: steps, start/end sigma, training timesteps, micro-conditioning."""
    out = []
    for stage in stages:
        t = grids.grid_timesteps(stage.sigmas, timestep_table(stage.model.alphas_cumprod))
        micro = getattr(stage.conditioner, "micro", None)  # SDXL conditioners hold their micro-conditioning
        out.append({
            "stage": stage.name,
            "steps": stage.steps,
            "sigma_start": float(stage.sigmas[0]),
            "sigma_end": float(stage.sigmas[-1]),
            "timesteps": [int(v) for v in t[: stage.steps]],
            "micro_conditioning": micro.as_dict() if micro is not None else None,
        })
    return out
