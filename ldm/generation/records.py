"""What a run records: the run manifest's header (everything ``sdgen replay`` needs) and the PNG parameters line
(AUTOMATIC1111's ``Key: value`` format, facts.md section 13)."""

from __future__ import annotations

import logging
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ldm import __version__
from ldm.adapters.adapter_set import parse_lora_flag
from ldm.generation.plan import ModelSpec, RunPlan
from ldm.generation.request import Settings
from ldm.generation.stages import Stage, stage_summary
from ldm.model_files import file_sha256
from ldm.output import make_grid, make_xy_grid, png_pixels

logger = logging.getLogger(__name__)

SAMPLER_LABELS = {  # the names AUTOMATIC1111 writes in "Sampler: ..."
    "ddim": "DDIM",
    "plms": "PLMS",
    "dpmpp_2m": "DPM++ 2M",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "lms": "LMS",
    "unipc": "UniPC",
}
SCHEDULE_LABELS = {  # A1111's "Schedule type" values ("Automatic", the sampler's own, is not written)
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
}


def absolute(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute for the manifest (None stays None)."""
    return str(Path(path).expanduser().resolve()) if path else None


def model_record(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    """The manifest's description of a model: config and checkpoint paths and hashes."""
    return {"config": str(spec.files.config), "config_sha256": file_sha256(spec.files.config),
            "config_chosen_because": spec.config_reason or None,
            "checkpoint": str(spec.files.checkpoint), "checkpoint_sha256": spec.sha256, "model_hash": spec.sha256[:10],
            **extra}


def recorded_options(plan: RunPlan) -> dict[str, Any]:
    """The options as the manifest records them: every default filled in, the files as absolute paths, the models'
    resolved configs and checkpoints, no prompt list (the manifest holds the prompts)."""
    opts = plan.opts
    main, last = plan.models[0], plan.models[-1]
    changes: dict[str, Any] = {
        "outdir": str(plan.out.root.resolve()), "from_file": absolute(opts.from_file),
        "init_img": absolute(opts.init_img), "safety_checker": absolute(opts.safety_checker),
        "clip_stats": absolute(opts.clip_stats), "embedder_ckpt": absolute(opts.embedder_ckpt), "prompt_list": None,
        "lora": [f"{absolute(path)}:{weight:g}" for path, weight in map(parse_lora_flag, opts.lora)],
        "lora_dir": absolute(opts.lora_dir or "models/lora"), "embedding": [absolute(p) for p in opts.embedding],
        "embeddings_dir": absolute(opts.embeddings_dir or "models/embeddings"), "vae": absolute(opts.vae),
    }
    if last.role == "refiner":
        changes.update(refiner_ckpt=str(last.files.checkpoint), refiner_config=str(last.files.config))
    if main.role != "refiner":
        changes.update(ckpt=str(main.files.checkpoint), config=str(main.files.config))
    if opts.command == "sdxl-refine":
        changes.update(height=plan.settings.height, width=plan.settings.width)
    return replace(opts, **changes).to_dict()


def manifest_header(plan: RunPlan, stages: Sequence[Stage], notices: Sequence[str] = ()) -> dict[str, Any]:
    """The run manifest's header: the command, versions, options, models, inputs, stages, prompts and seeds."""
    opts, main = plan.opts, plan.models[0]
    extra: dict[str, Any] = {}
    if main.kind == "unclip":
        extra["clip_stats_sha256"] = file_sha256(opts.clip_stats) if opts.clip_stats else None
        extra["embedder_ckpt_sha256"] = file_sha256(opts.embedder_ckpt) if opts.embedder_ckpt else None
    header: dict[str, Any] = {
        "command": opts.command,
        "versions": {"sdgen": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(plan.device),
        "options": recorded_options(plan),
        "model": model_record(main, **extra),
    }
    if len(plan.models) > 1 or main.role == "refiner":
        header["refiner"] = model_record(plan.models[-1])
    if plan.prior is not None:
        prior = plan.prior
        header["prior"] = {"checkpoint": str(prior.checkpoint), "checkpoint_sha256": prior.sha256,
                           "config": str(prior.config_path),
                           "clip": str(prior.clip) if prior.clip else None,
                           "clip_sha256": file_sha256(prior.clip) if prior.clip else None,
                           "clip_stats": str(prior.stats) if prior.stats else None,
                           "clip_stats_sha256": file_sha256(prior.stats) if prior.stats else None}
        header["noise_level"] = plan.settings.noise_level
    if plan.conditioning_images:
        header["init_images"] = [{"path": str(i.path.resolve()), "sha256": i.sha256,
                                  **({"extra": str(i.extra_path.resolve()), "extra_sha256": i.extra_sha256}
                                     if i.extra_path is not None else {})} for i in plan.init_images]
        header["init_image_of"] = [job.init_image for batch in plan.batches for job in batch]
        if plan.opts.command in ("unclip-variate", "upscale"):
            header["noise_level"] = plan.settings.noise_level
    elif plan.init_images:
        header["init_image"] = {"path": str(plan.init_images[0].path.resolve()), "sha256": plan.init_images[0].sha256}
    from ldm.engines import engine_record

    header.update(engine_record(plan.opts.engine))
    header.update({
        "notices": list(notices),
        "adapters": plan.adapters.record(),
        "settings": plan.settings.record(),
        "settings_groups": [settings.record() for settings in plan.groups],
        "stages": stage_summary(stages),
        "sweeps": [{"field": s.field, "values": list(s.values)} for s in plan.sweeps],
        "entries": [{"prompt": e.prompt, "where": e.where, "overrides": e.overrides, **({"tags": e.tags} if e.tags else {})}
                    for e in plan.entries],
        "prompts": plan.prompts,
        "per_image_prompts": opts.per_image_prompts,
        "sampler": plan.settings.sampler,
        "steps": plan.settings.steps,
        "size": [plan.settings.width, plan.settings.height],
        "seeds": [job.seed for batch in plan.batches for job in batch],
    })
    return header


def png_settings(plan: RunPlan, settings: Settings, stages: Sequence[Stage],
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``Key: value`` line of the PNG parameters (A1111 order) of images made with ``settings``, then ``extra``
    (e.g. the SLD settings); the per-image keys (Seed, Batch size, Batch pos) are filled in by the writer. None
    values are left out of the file."""
    main = plan.models[0]
    refiners = [s for s in stages if getattr(s.model, "is_refiner", False)]
    micro = getattr(stages[0].conditioner, "micro", None)
    two_stage = len(plan.models) == 2
    return {
        "Steps": settings.steps,
        "Sampler": SAMPLER_LABELS.get(settings.sampler, settings.sampler),
        "CFG scale": settings.scale,
        "Seed": None,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": main.sha256[:10],
        "Model": main.files.checkpoint.stem,
        "Denoising strength": settings.strength,
        "Schedule type": SCHEDULE_LABELS.get(settings.schedule),
        "Eta DDIM": settings.eta if settings.sampler == "ddim" and settings.eta else None,
        "Noise level": (settings.noise_level if plan.opts.command in ("unclip-variate", "upscale")
                        or plan.prior is not None else None),
        "Prior": f"{plan.prior.checkpoint.stem} [{plan.prior.sha256[:10]}]" if plan.prior is not None else None,
        "Prior steps": settings.prior_steps,
        "Prior scale": settings.prior_scale,
        "Init image": None,
        "Timestep grid": settings.grid if micro is not None and settings.schedule == "default" else None,
        "Refiner": f"{plan.models[-1].files.checkpoint.stem} [{plan.models[-1].sha256[:10]}]" if two_stage else None,
        "Refiner switch at": settings.high_noise_frac if two_stage else None,
        "Original size": "{},{}".format(*micro.original_size) if micro is not None else None,
        "Crop": "{},{}".format(*micro.crop_coords) if micro is not None else None,
        "Target size": ("{},{}".format(*micro.target_size)
                        if micro is not None and not getattr(stages[0].model, "is_refiner", False) else None),
        "Aesthetic score": (f"{settings.aesthetic_score}/{settings.negative_aesthetic_score}" if refiners else None),
        "S churn": settings.s_churn or None,
        "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,
        **plan.adapters.png_fields(text for batch in plan.batches for job in batch
                                   for text in (job.prompt, job.negative_prompt)),
        "Prompt syntax": settings.prompt_syntax,
        **(extra or {}),
        "Batch size": None,
        "Batch pos": None,
        "Precision": settings.precision,
        "Engine": _engine_field(settings.engine),
        "Version": f"sdgen {__version__}",
    }


def grid_image(plan: RunPlan, writer: Any, complete: bool) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The run's grid (None with ``--skip_grid``) and the parameters it carries (its first image's).

    All images in index order, ``--n_rows`` per row (CompVis ``make_grid``); with ``--sweep`` the labelled X/Y plot
    instead (:func:`ldm.output.make_xy_grid`). Made from the images in memory when this process made them all
    (``complete``), else read back from the sample files.
    """
    opts = plan.opts
    jobs = [job for batch in plan.batches for job in batch]
    if opts.skip_grid or not jobs:
        return None, None
    pixels: dict[int, np.ndarray] = dict(writer.pixels) if complete else {}
    for job in jobs:
        if job.index not in pixels:
            path = plan.out.sample_path(job.index)
            if not path.is_file():
                logger.warning("no grid: image %d (%s) is not on disk", job.index, path.name)
                return None, None
            pixels[job.index] = png_pixels(path)
    first = writer.first_parameters.get(jobs[0].index)
    if not plan.sweeps:
        return make_grid([pixels[job.index] for job in jobs], opts.n_rows or opts.n_samples), first
    x_axis, y_axis = plan.sweeps[0], (plan.sweeps[1] if len(plan.sweeps) > 1 else None)
    cells: dict[tuple[int, int], list[np.ndarray]] = {}
    for job in jobs:
        values = dict(job.cell)
        x = x_axis.values.index(values[x_axis.field])
        y = y_axis.values.index(values[y_axis.field]) if y_axis is not None else 0
        cells.setdefault((y, x), []).append(pixels[job.index])
    x_labels = [f"{x_axis.label}: {v}" for v in x_axis.values]
    y_labels = [f"{y_axis.label}: {v}" for v in y_axis.values] if y_axis is not None else [""]
    return make_xy_grid(cells, x_labels, y_labels), first


def _engine_field(engine: str) -> Optional[str]:
    """The PNG's ``Engine`` field: none for the default torch engine, else the engine and its version."""
    if engine == "torch":
        return None
    from ldm.engines import engine_record

    return f"{engine} {engine_record(engine)['engine_version']}"
