"""The run engine: options -> :func:`~ldm.generation.plan.plan_run` -> :func:`run` -> images and manifest.

:func:`execute` is what every generation command calls: it plans the run (every input check, before any process
or model starts), starts the run's processes (:mod:`ldm.generation.distributed`), and runs this process's share.
:func:`replay_manifest` runs a recorded run again through the same engine, refusing files whose sha256 changed.
:func:`run` loads the planned models, builds the stages of each settings group, and writes every image as soon as
its batch is decoded (:mod:`ldm.generation.writer`): a Ctrl-C keeps everything finished so far and ends the
manifest as "interrupted"; ``--resume`` makes only the images that are missing.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from ldm.adapters.adapter_set import apply_adapters
from ldm.engines import apply_engine
from ldm.errors import SdgenError
from ldm.generation.distributed import World, check_same_run, check_shared_folder, start
from ldm.generation.generate import generate, generate_model_by_model
from ldm.generation.inference import precision_hint, prepare_for_inference, weights_dtype
from ldm.generation.options import GenerateOptions
from ldm.generation.plan import ModelSpec, RunPlan, plan_run
from ldm.generation.records import grid_image, manifest_header, png_settings
from ldm.generation.request import Settings
from ldm.generation.stages import build_stages, make_stage
from ldm.generation.writer import RunWriter, finished_jobs, read_parts
from ldm.output import RunResult, load_manifest

logger = logging.getLogger(__name__)


class Progress(Protocol):
    """What a run reports while it works (a progress bar, a log): the run's size and what is done already, each
    sampler step of a batch, and the number of images done so far (all processes)."""

    def start(self, images: int, done: int) -> None: ...

    def batch(self, jobs: list) -> None: ...

    def step(self, done: int, total: int) -> None: ...

    def images_done(self, done: int) -> None: ...


def load_run_model(spec: ModelSpec, plan: RunPlan) -> Any:
    """Load one planned model on the plan's device (unCLIP with its image tower and CLIP statistics)."""
    from ldm.checkpoint import load_model

    offload = plan.opts.offload
    home = torch.device("cpu") if offload else plan.device  # --offload: weights in host memory
    logger.info("loading %s with %s on %s", spec.files.checkpoint, spec.files.config, home)
    if spec.kind == "unclip":
        from ldm.models.diffusion.unclip import load_unclip_model

        prior = plan.prior
        model = load_unclip_model(str(spec.files.config), spec.files.checkpoint, embedder_ckpt=plan.opts.embedder_ckpt,
                                  clip_stats=prior.stats if prior is not None else plan.opts.clip_stats, device=home,
                                  text_ckpt=prior.clip if prior is not None else None)
    else:
        # SDXL loads straight into its reduced-precision dtype (half the memory); SD 1.x / 2.x load float32 and
        # convert the UNet and text encoders only (their VAE keeps float32 weights)
        dtype = weights_dtype(spec.kind, plan.opts.precision, plan.device) if spec.kind == "sdxl" else None
        model = load_model(spec.config, spec.files.checkpoint, device=home, dtype=dtype)
    model = prepare_for_inference(model, plan.opts.precision, plan.device, compile=plan.opts.compile,
                                  vae_tiling=plan.opts.vae_tiling or plan.opts.tile,  # upscale --tile: tiled decode
                                  engine=plan.opts.engine)
    if offload:
        from ldm.generation.offload import offload_model

        offload_model(model, plan.device)
    return model


def load_run_prior(plan: RunPlan) -> Any:
    """The Karlo prior of an unCLIP-L text-to-image run (bf16 weights in a bf16 run), or None."""
    if plan.prior is None:
        return None
    from ldm.models.prior.files import load_prior

    dtype = torch.bfloat16 if plan.opts.precision == "bf16" else None
    return load_prior(plan.prior, device=plan.device, dtype=dtype)


def load_stage(plan: RunPlan, k: int, sigmas: Any, settings: Settings) -> Any:
    """``--low-memory``: load the run's model ``k`` (with the run's adapters) and build its stage on ``sigmas``."""
    spec = plan.models[k]
    model = load_run_model(spec, plan)
    triggers = apply_adapters(model, plan.adapters, first=k == 0)
    apply_engine(model, plan.opts.engine, plan.opts.precision, plan.models_sha256() + [spec.sha256])
    return make_stage(spec.role, model, sigmas, settings, (), triggers, two_stage=len(plan.models) == 2)


def input_names(plan: RunPlan, job: Any) -> dict[str, str]:
    """A job's input files for its PNG parameters: the image, and its mask or depth map."""
    image = plan.init_images[job.init_image]
    names = {"Init image": image.path.name}
    if image.extra_path is not None:
        names["Mask" if plan.opts.command == "inpaint" else "Depth map"] = image.extra_path.name
    return names


def job_record(plan: RunPlan, job: Any) -> dict[str, Any]:
    """What decides a job's pixels, as its image file records it (compared by ``--resume``)."""
    init = plan.init_images[job.init_image].key_sha256 if job.init_image is not None else None
    return job.key(plan.models_sha256(), init)


def open_run(plan: RunPlan) -> dict[str, Any]:
    """Process 0: the run to write (a new one, or with ``--resume`` the folder's latest) and the jobs it has."""
    out = plan.out
    if not plan.opts.resume:
        return {"run_number": out.run_number, "first_sample": out.first_sample, "done": set(), "previous": []}
    path = out.latest_manifest()
    if path is None:
        raise SdgenError(f"--resume: {out.root} holds no run manifest (run-NNNN.json) to resume")
    data = load_manifest(path)
    if data.get("command") != plan.opts.command:
        raise SdgenError(f"--resume: the latest run in {out.root} ({path.name}) is a {data.get('command')} run, not "
                         f"{plan.opts.command}")
    if "first_sample" not in data:
        raise SdgenError(f"--resume: {path.name} was written by an sdgen without resumable runs; start a new run")
    out.continue_run(int(path.stem.split("-")[1]), int(data["first_sample"]))
    done = finished_jobs(out, {job.index: job_record(plan, job) for batch in plan.batches for job in batch})
    records = {int(r["index"]): r for r in list(data.get("images") or []) + read_parts(out)}
    previous = [records[k] for k in sorted(records) if k in done]
    logger.info("resuming %s: %d of %d images are there", path.name, len(done), plan.num_images)
    return {"run_number": out.run_number, "first_sample": out.first_sample, "done": done, "previous": previous}


def _poll(writer: RunWriter, plan: RunPlan, done: int, progress: Progress, stop: threading.Event) -> None:
    """Process 0 of several: count every process's written images (their part files) for the progress bar."""
    while not stop.wait(0.5):
        progress.images_done(done + len(read_parts(plan.out)))


def run(plan: RunPlan, *, world: Optional[World] = None, progress: Optional[Progress] = None,
        notify: Callable[[str], None] = logger.warning) -> Optional[RunResult]:
    """Generate and write this process's share of ``plan``; process 0 returns the run's result once all are
    done (the others None). ``notify`` receives the run's one-line notices."""
    from ldm.models.diffusion.unclip import missing_clip_stats_notice
    from ldm.safety.postprocess import OutputSafety
    from ldm.sampling.guidance import CFGGuidance
    from ldm.sampling.sld import SLDGuidance

    world = world or World()
    opts = plan.opts
    if opts.offload and plan.device.type != "cuda":
        raise SdgenError(f"--offload moves the model's parts to a GPU while they run; this run is on "
                         f"{plan.device.type} (use --device cuda, or leave --offload out)")
    check_same_run(world, {"checkpoints": plan.models_sha256(), "images": plan.num_images,
                           "init images": [i.sha256 for i in plan.init_images]})
    check_shared_folder(world, plan.out.root)
    state = world.broadcast(open_run(plan) if world.is_main else None)
    plan.out.continue_run(state["run_number"], state["first_sample"])
    done: set[int] = state["done"]
    todo = [batch for b, batch in enumerate(plan.batches)
            if world.owns(b) and any(job.index not in done for job in batch)]

    safety = OutputSafety.resolve(opts.safety_checker, disabled=opts.no_safety_checker, watermark=opts.watermark,
                                  model_config=plan.models[-1].config, device=plan.device)
    # --low-memory (base -> refiner): the models load one at a time while sampling; until then weightless
    # stand-ins built on the meta device give the stages' grids and the records their settings
    low_memory = opts.low_memory and len(plan.models) == 2
    if low_memory:
        from ldm.checkpoint import build_model_on_meta

        models = [(spec.role, build_model_on_meta(spec.config)) for spec in plan.models]
    else:
        models = [(spec.role, load_run_model(spec, plan)) for spec in plan.models] if todo or world.is_main else []
    prior = load_run_prior(plan) if models else None
    triggers: list[str] = []
    for n, (_, model) in enumerate(models if not low_memory else ()):
        triggers = apply_adapters(model, plan.adapters, first=n == 0)
        apply_engine(model, opts.engine, opts.precision, plan.models_sha256() + [plan.models[n].sha256])
    # notices about the models (the manifest's "notices"), then notes on how the run was set up ("run_notes")
    if plan.prior is not None:
        from ldm.models.prior.files import missing_stats_notice

        notices = [n for n in (missing_stats_notice(plan.prior),) if n]
    else:
        notices = [n for n in (missing_clip_stats_notice(m) for _, m in models if hasattr(m, "needs_clip_stats")) if n]
    notes = [f"config {spec.files.config.name} ({spec.config_reason})" for spec in plan.models if spec.config_reason]
    notes += plms_notices(plan, [model for _, model in models])
    if opts.command == "inpaint":
        notes.append("inpainting with the model's own mask input (mask and masked-image latent as UNet channels)"
                     if plan.models[0].kind == "inpaint" else "inpainting with an ordinary checkpoint: the known "
                     "region is blended in at each step (the original DDIM sampler's mask / x0 route)")
    hint = precision_hint(opts.precision, plan.device)
    if hint and not plan.uses_demo_model:
        notes.append(hint)
    for notice in notices + notes if world.is_main else ():
        notify(notice)
    tensors = [image.tensor for image in plan.init_images]
    conditioning = tensors if plan.conditioning_images else ()
    stages_of: dict[Settings, tuple] = {}

    def stages_for(settings: Settings) -> tuple:
        if settings not in stages_of:
            stages_of[settings] = build_stages(models, settings, conditioning, triggers, prior,
                                               task=opts.command if plan.conditioning_images else None)
        return stages_of[settings]

    lines: dict[Settings, dict] = {}

    def settings_line(job: Any) -> dict:
        if job.settings not in lines:
            extra = SLDGuidance.from_record(job.settings.sld).png_settings(job.settings.scale) if job.settings.sld else {}
            lines[job.settings] = png_settings(plan, job.settings, stages_for(job.settings)[0], extra)
        return lines[job.settings]

    line_tags = {entry.where: entry.tags for entry in plan.entries if entry.tags}  # e.g. an I2P row's categories
    header = {**manifest_header(plan, stages_for(plan.settings)[0] if models else [], notices), "run_notes": notes,
              "first_sample": plan.out.first_sample}
    writer = RunWriter(
        plan.out, rank=world.rank, main=world.is_main, header=header, safety=safety, settings_line=settings_line,
        batch_sizes={job.batch: len(batch) for batch in plan.batches for job in batch}, skip_save=opts.skip_save,
        job_record=lambda job: job_record(plan, job), previous=state["previous"],
        per_image=(lambda job: input_names(plan, job)) if plan.conditioning_images else None,
        tags_of=(lambda job: line_tags.get(job.where)) if line_tags else None,
    )
    if progress is not None:
        progress.start(plan.num_images, len(done))
    stop = threading.Event()
    if progress is not None and world.size > 1:
        threading.Thread(target=_poll, args=(writer, plan, len(done), progress, stop), daemon=True).start()
    try:
        for settings, batches in _groups(todo):
            stages, start_sigma = stages_for(settings)
            guidance = SLDGuidance.from_record(settings.sld) if settings.sld else CFGGuidance()
            logger.info("process %d: %d batches of %s, %d steps", world.rank, len(batches), settings.sampler,
                        settings.steps)
            callbacks = {"guidance": guidance, "safety_checker": safety.checker,
                         "on_step": progress.step if progress is not None else None,
                         "on_batch": progress.batch if progress is not None else None}
            if low_memory:
                loaders = [partial(load_stage, plan, k, stage.sigmas, settings) for k, stage in enumerate(stages)]
                images = generate_model_by_model(loaders, [stage.sigmas for stage in stages], batches, settings,
                                                 **callbacks)
            else:
                images = generate(stages, batches, settings, start_sigma=start_sigma, init_images=tensors, **callbacks)
            for image in images:
                if image.job.index in done:
                    continue  # a batch is made whole (the same pixels); its images already there are kept
                writer.write(image)
                if progress is not None and world.size == 1:
                    progress.images_done(len(done) + writer.written)
    except KeyboardInterrupt:
        stop.set()
        raise writer.interrupted(plan.num_images) from None
    except BaseException:
        stop.set()
        writer.failed()
        raise
    writer.close()
    world.wait_for_all()
    stop.set()
    if not world.is_main:
        return None
    grid, parameters = grid_image(plan, writer, complete=not done and world.size == 1)
    return writer.complete(grid, parameters)


PLMS_MIN_STEPS_V = 31  # the demo model (v-prediction) gives broken PLMS images at 30 steps or fewer


def plms_notices(plan: RunPlan, models: list) -> list[str]:
    """A warning when PLMS runs few steps on a v-prediction model (its multistep start breaks there: the demo
    model's images are broken at 30 steps or fewer)."""
    if not any(getattr(m, "parameterization", "eps") == "v" for m in models):
        return []
    few = sorted({g.steps for g in plan.groups if g.sampler == "plms" and g.steps < PLMS_MIN_STEPS_V})
    if not few:
        return []
    return [f"PLMS with {', '.join(map(str, few))} steps on a v-prediction model can give broken images (the demo "
            f"model does below {PLMS_MIN_STEPS_V}); use more steps or another sampler (dpmpp_2m, ddim)"]


def _groups(batches: list[list[Any]]) -> list[tuple[Settings, list[list[Any]]]]:
    """Consecutive batches with equal settings, in plan order (one set of stages each)."""
    out: list[tuple[Settings, list[list[Any]]]] = []
    for batch in batches:
        settings = batch[0].settings
        if out and out[-1][0] == settings:
            out[-1][1].append(batch)
        else:
            out.append((settings, [batch]))
    return out


def execute(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None,
            progress: Optional[Progress] = None, notify: Callable[[str], None] = logger.warning
            ) -> Optional[RunResult]:
    """Plan, start the processes of, and run a generation command from its options; ``expect`` holds hashes a
    replay must find. Process 0 returns the run's result, the others None."""
    plan = plan_run(opts, expect=expect)
    world = start(opts.devices, opts.num_nodes, opts.accelerator, opts.dist_timeout, opts.threads)
    if world.device is not None:
        plan.device = world.device
    return run(plan, world=world, progress=progress if world.is_main else None, notify=notify)


REPLAYABLE = ("txt2img", "img2img", "safe-txt2img", "unclip-variate", "sdxl-refine", "inpaint", "depth2img", "upscale")


def options_from_manifest(data: Mapping[str, Any], outdir: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[GenerateOptions, dict[str, Any]]:
    """(options, expected hashes) to run a recorded run again (output folder and device overridden when given)."""
    command = data.get("command")
    if command not in REPLAYABLE:
        raise SdgenError(f"cannot replay a {command!r} run (replayable: {', '.join(REPLAYABLE)})")
    changes: dict[str, Any] = {"command": command, "resume": False}
    if data.get("per_image_prompts"):  # a prompt file: its lines as recorded (with their own settings)
        if data.get("entries") is not None:
            changes["prompt_entries"] = list(data["entries"])
        else:
            changes["prompt_list"] = list(data["prompts"])
    opts = GenerateOptions.from_record(data.get("options") or {}, **changes)
    opts = GenerateOptions.from_record({**opts.to_dict(), "outdir": outdir or opts.outdir,
                                        "device": device or data.get("device", opts.device)})
    inits = data.get("init_images")
    expect = {
        "checkpoint_sha256": (data.get("model") or {}).get("checkpoint_sha256"),
        "refiner_checkpoint_sha256": (data.get("refiner") or {}).get("checkpoint_sha256"),
        "init_image_sha256": ([entry["sha256"] + (f"+{entry['extra_sha256']}" if entry.get("extra_sha256") else "")
                               for entry in inits] if inits is not None
                              else (data.get("init_image") or {}).get("sha256")),
        "prior_sha256": (data.get("prior") or {}).get("checkpoint_sha256"),
        "adapters": data.get("adapters"),
    }
    return opts, expect


def replay_manifest(path_or_data: Any, outdir: Optional[str] = None, device: Optional[str] = None, *,
                    progress: Optional[Progress] = None) -> Optional[RunResult]:
    """Run a recorded run again (a manifest path or its loaded data), to identical images on the same device."""
    data = path_or_data if isinstance(path_or_data, Mapping) else load_manifest(path_or_data)
    opts, expect = options_from_manifest(data, outdir, device)
    return execute(opts, expect=expect, progress=progress)


__all__ = ["execute", "run", "replay_manifest", "options_from_manifest", "Progress"]
