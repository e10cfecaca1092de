"""The run engine: options -> :func:`~ldm.generation.plan.plan_run` -> :func:`run` -> images and manifest.

:func:`execute` is what every generation command calls; :func:`replay_manifest` runs a recorded run again
through the same engine (refusing files whose sha256 changed). :func:`run` loads the planned models, builds the
stages, and writes every image as soon as its batch is decoded (:class:`ldm.output.RunWriter`): a Ctrl-C keeps
everything finished so far and ends the manifest as "interrupted".
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from ldm.errors import SdgenError
from ldm.generation.generate import generate
from ldm.generation.options import GenerateOptions
from ldm.generation.plan import ModelSpec, RunPlan, plan_run
from ldm.generation.records import manifest_header, png_settings
from ldm.generation.stages import build_stages
from ldm.output import RunResult, RunWriter, load_manifest

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """What a run reports while it works (a progress bar, a log): the run's size, each sampler step of a batch
    and each written image."""

    def start(self, images: int, batches: int) -> None: ...

    def batch(self, jobs: list) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def image(self) -> None: ...


def weights_dtype(kind: str, precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Weights dtype of a model: SDXL in float16 under CUDA fp16 autocast (halves memory; its VAE runs in float32)
    and bfloat16 for bf16; SD 1.x / 2.x keep float32 weights under autocast, as the originals do."""
    if kind != "sdxl":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and precision in ("autocast", "fp16"):
        return torch.float16
    return torch.float32


def load_run_model(spec: ModelSpec, plan: RunPlan) -> Any:
    """Load one planned model on the plan's device (unCLIP with its image tower and CLIP statistics)."""
    from ldm.checkpoint import load_model

    logger.info("loading %s with %s on %s", spec.files.checkpoint, spec.files.config, plan.device)
    if spec.kind == "unclip":
        from ldm.models.diffusion.unclip import load_unclip_model

        return load_unclip_model(str(spec.files.config), spec.files.checkpoint, embedder_ckpt=plan.opts.embedder_ckpt,
                                 clip_stats=plan.opts.clip_stats, device=plan.device)
    return load_model(spec.config, spec.files.checkpoint, device=plan.device,
                      dtype=weights_dtype(spec.kind, plan.opts.precision, plan.device))


def run(plan: RunPlan, *, progress: Optional[Progress] = None,
        notify: Callable[[str], None] = logger.warning) -> RunResult:
    """Generate and write every image of ``plan``; ``notify`` receives the run's one-line notices."""
    from ldm.models.diffusion.unclip import missing_clip_stats_notice
    from ldm.safety.postprocess import OutputSafety
    from ldm.sampling.guidance import CFGGuidance
    from ldm.sampling.sld import SLDGuidance

    opts, settings = plan.opts, plan.settings
    safety = OutputSafety.resolve(opts.safety_checker, disabled=opts.no_safety_checker, watermark=opts.watermark,
                                  model_config=plan.models[-1].config, device=plan.device)
    guidance = SLDGuidance.from_record(opts.sld) if opts.sld else CFGGuidance()
    models = [(spec.role, load_run_model(spec, plan)) for spec in plan.models]
    notices = [n for n in (missing_clip_stats_notice(m) for _, m in models if hasattr(m, "needs_clip_stats")) if n]
    for notice in notices:
        notify(notice)
    tensors = [image.tensor for image in plan.init_images]
    stages, start_sigma = build_stages(models, settings, tensors if plan.conditioning_images else ())

    extra = guidance.png_settings(settings.scale) if opts.sld else {}
    names = [image.path.name for image in plan.init_images]
    writer = RunWriter(
        plan.out, manifest_header(plan, stages, notices), safety, png_settings(plan, stages, extra),
        batch_sizes={job.batch: len(batch) for batch in plan.batches for job in batch},
        skip_save=opts.skip_save, skip_grid=opts.skip_grid, n_rows=opts.n_rows or opts.n_samples,
        per_image=(lambda job: {"Init image": names[job.init_image]}) if plan.conditioning_images else None,
    )
    if progress is not None:
        progress.start(plan.num_images, len(plan.batches))
    images = generate(stages, plan.batches, settings, start_sigma=start_sigma, init_images=tensors,
                      guidance=guidance, safety_checker=safety.checker,
                      on_step=progress.step if progress is not None else None,
                      on_batch=progress.batch if progress is not None else None)
    try:
        for image in images:
            writer.write(image)
            if progress is not None:
                progress.image()
    except KeyboardInterrupt:
        raise writer.interrupted(plan.num_images) from None
    except BaseException:
        writer.failed()
        raise
    return writer.complete()


def execute(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None,
            progress: Optional[Progress] = None, notify: Callable[[str], None] = logger.warning) -> RunResult:
    """Plan and run a generation command from its options; ``expect`` holds hashes a replay must find."""
    return run(plan_run(opts, expect=expect), progress=progress, notify=notify)


REPLAYABLE = ("txt2img", "img2img", "safe-txt2img", "unclip-variate", "sdxl-refine")


def options_from_manifest(data: Mapping[str, Any], outdir: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[GenerateOptions, dict[str, Any]]:
    """(options, expected hashes) to run a recorded run again (output folder and device overridden when given)."""
    command = data.get("command")
    if command not in REPLAYABLE:
        raise SdgenError(f"cannot replay a {command!r} run (replayable: {', '.join(REPLAYABLE)})")
    changes: dict[str, Any] = {"command": command}
    if data.get("per_image_prompts"):
        changes["prompt_list"] = list(data["prompts"])
    opts = GenerateOptions.from_record(data.get("options") or {}, **changes)
    opts = GenerateOptions.from_record({**opts.to_dict(), "outdir": outdir or opts.outdir,
                                        "device": device or data.get("device", opts.device)})
    inits = data.get("init_images")
    expect = {
        "checkpoint_sha256": (data.get("model") or {}).get("checkpoint_sha256"),
        "refiner_checkpoint_sha256": (data.get("refiner") or {}).get("checkpoint_sha256"),
        "init_image_sha256": ([entry["sha256"] for entry in inits] if inits is not None
                              else (data.get("init_image") or {}).get("sha256")),
    }
    return opts, expect


def replay_manifest(path_or_data: Any, outdir: Optional[str] = None, device: Optional[str] = None, *,
                    progress: Optional[Progress] = None) -> RunResult:
    """Run a recorded run again (a manifest path or its loaded data), to identical images on the same device."""
    data = path_or_data if isinstance(path_or_data, Mapping) else load_manifest(path_or_data)
    opts, expect = options_from_manifest(data, outdir, device)
    return execute(opts, expect=expect, progress=progress)
