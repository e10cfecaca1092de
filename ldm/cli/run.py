"""One generation run: options -> early checks -> model -> generation -> files.

:func:`write_run` is the output loop of every generation command (txt2img, img2img, safe-txt2img,
unclip-variate, sdxl-refine): each image is written as soon as its batch is decoded, with its PNG parameters,
after the safety checker and with the invisible watermark (:class:`~ldm.safety.postprocess.OutputSafety`); the
manifest is rewritten after each image, so a Ctrl-C keeps everything finished so far; the grid comes last.

:func:`execute` runs txt2img / img2img / safe-txt2img. Everything a user can get wrong is checked before the
model is loaded (numbers, prompt file, init image, config and checkpoint paths, output folder), each failing
with one :class:`~ldm.errors.SdgenError` line. An SDXL config (a ``DiffusionEngine``) runs through
:func:`ldm.sdxl_pipeline.generate_sdxl` (img2img: SDEdit on that model) with the SGM demo's sampling defaults.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ldm import __version__
from ldm import pipelines
from ldm.cli.options import COMPVIS_DEFAULTS, SDXL_FIELDS, GenerateOptions, RunOptions, parse_pair, sdxl_settings
from ldm.cli.output import ImageRecord, OutputFolder, RunManifest, format_parameters, relative_to
from ldm.errors import SdgenError
from ldm.pipelines import (
    PRECISIONS,
    BatchCallback,
    GeneratedImage,
    GenerationRequest,
    ImageJob,
    ModelFiles,
    StepCallback,
    check_sampler_grid,
    image_to_tensor,
    latent_size_multiple,
    prompt_batches,
    read_image,
    resolve_checkpoint,
    unet_in_channels,
    vae_downsampling_factor,
)

logger = logging.getLogger(__name__)

SAMPLER_LABELS = {  # the names AUTOMATIC1111 writes in "Sampler: ..."
    "ddim": "DDIM",
    "plms": "PLMS",
    "dpmpp_2m": "DPM++ 2M",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
}

#: What a replay's ``expect`` entries compare, and what to say when they differ.
EXPECTATIONS = {
    "checkpoint_sha256": "the checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "refiner_checkpoint_sha256": "the refiner checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "init_image_sha256": "the init image differs from the one the manifest recorded (sha256 mismatch)",
}


class RunInterrupted(SdgenError):
    """Ctrl-C during a run, after the finished images were kept (exit code 130)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


@dataclass
class RunResult:
    """What a run wrote."""

    outdir: Path
    samples: list[Path]
    grid: Optional[Path]
    manifest: Path


# ----------------------------------------------------------------------------- early checks


def check_options(opts: GenerateOptions) -> None:
    """Validate the flags that need no file (raises SdgenError); unset (None) sampling flags are skipped."""
    from ldm.sampling.samplers import SAMPLERS

    if opts.steps is not None and opts.steps < 1:
        raise SdgenError(f"--steps must be at least 1, got {opts.steps}")
    for flag, value in (("--n_samples", opts.n_samples), ("--n_iter", opts.n_iter), ("--C", opts.latent_channels)):
        if value is not None and value < 1:
            raise SdgenError(f"{flag} must be at least 1, got {value}")
    if opts.n_rows < 0:
        raise SdgenError(f"--n_rows must be 0 (= n_samples) or more, got {opts.n_rows}")
    if opts.factor is not None and opts.factor < 1:
        raise SdgenError(f"--f must be at least 1, got {opts.factor}")
    for flag, value in (("--H", opts.height), ("--W", opts.width)):
        if value is None:
            continue
        if value <= 0 or value % 8:
            raise SdgenError(f"{flag} must be a positive multiple of 8, got {value}")
        if opts.factor and value % opts.factor:
            raise SdgenError(f"{flag} {value} is not a multiple of --f {opts.factor}")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.eta < 0:
        raise SdgenError(f"--ddim_eta must be >= 0, got {opts.eta}")
    if opts.sampler == "plms" and opts.eta != 0:
        raise SdgenError("PLMS is deterministic: --ddim_eta must be 0 with --plms")
    if opts.precision not in PRECISIONS:
        raise SdgenError(f"unknown --precision {opts.precision!r} ({', '.join(PRECISIONS)})")
    for name in ("original_size", "crop_coords", "target_size"):
        parse_pair(SDXL_FIELDS[name], getattr(opts, name))
    if opts.command == "img2img":
        if not opts.init_img:
            raise SdgenError("img2img needs an input image: pass --init-img PATH")
        if not 0.0 < opts.strength <= 1.0:
            raise SdgenError(f"--strength must be in (0, 1], got {opts.strength}")


def read_prompts(opts: Any) -> list[str]:
    """The run's prompts: ``prompt_list`` (replay), the lines of ``--from-file``, or the single prompt."""
    if opts.prompt_list is not None:
        return list(opts.prompt_list)
    if opts.from_file is None:
        return [opts.prompt]
    from ldm.files import read_text_file

    path = Path(opts.from_file)
    text = read_text_file(path, "prompt file")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SdgenError(f"the prompt file {path} holds no prompt (one prompt per line)")
    return prompts


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise SdgenError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N, mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdgenError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdgenError(f"--device {name}: MPS is not available here (use --device cpu)")
    return device


def check_expectations(expect: Optional[Mapping[str, Any]], found: Mapping[str, Any]) -> None:
    """Refuse files that differ from the ones a manifest recorded: every truthy ``expect`` entry (a key of
    :data:`EXPECTATIONS`) must equal ``found``'s (raises SdgenError)."""
    for key, value in (expect or {}).items():
        if value and value != found.get(key):
            raise SdgenError(EXPECTATIONS.get(key, f"{key} differs from the recorded one"))


def absolute(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute for the manifest (None stays None)."""
    return str(Path(path).expanduser().resolve()) if path else None


def fit_init_image(image: Any, height: Optional[int], width: Optional[int], multiple: int) -> torch.Tensor:
    """An init image (PIL, RGB) as (3, H, W) in [-1, 1]: resized to ``height`` x ``width`` where given (a missing
    side keeps the image's, rounded down to ``multiple``), else its own size rounded down (CV scripts/img2img.py)."""
    size = None
    if height is not None or width is not None:
        size = (width or image.width - image.width % multiple, height or image.height - image.height % multiple)
    return image_to_tensor(image, size, multiple)


# ----------------------------------------------------------------------------- the shared output loop


def progress_bar() -> Progress:
    """The progress display of a run on stderr (batches and sampler steps); off when stderr is no terminal."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def model_record(config: Path, checkpoint: Path, checkpoint_sha256: str, **extra: Any) -> dict[str, Any]:
    """The manifest's description of a model: config and checkpoint paths and hashes."""
    from ldm.checkpoint import file_sha256

    return {"config": str(config), "config_sha256": file_sha256(config), "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_sha256, "model_hash": checkpoint_sha256[:10], **extra}


def run_header(
    command: str,
    device: torch.device,
    options: Mapping[str, Any],
    model: Mapping[str, Any],
    request: GenerationRequest,
    prompts: list[str],
    per_image_prompts: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The run manifest's header: everything ``sdgen replay`` needs (``extra``: the command's own entries)."""
    return {
        "command": command,
        "versions": {"sdgen": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(device),
        "options": dict(options),
        "model": dict(model),
        **extra,
        "prompts": prompts,
        "per_image_prompts": per_image_prompts,
        "sampler": request.sampler,
        "steps": request.steps,
        "size": [request.width, request.height],
        "seeds": [job.seed for batch in request.jobs() for job in batch],
    }


def png_settings(request: GenerationRequest, checkpoint: Path, checkpoint_sha256: str,
                 extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The ``Key: value`` line of the PNG parameters (A1111 order), ``extra`` after the model; the per-image
    keys (Seed, Batch size, Batch pos) are filled in by :func:`write_run`. None values are left out."""
    return {
        "Steps": request.steps,
        "Sampler": SAMPLER_LABELS.get(request.sampler, request.sampler),
        "CFG scale": request.scale,
        "Seed": None,
        "Size": f"{request.width}x{request.height}",
        "Model hash": checkpoint_sha256[:10],
        "Model": checkpoint.stem,
        **dict(extra),
        "Batch size": None,
        "Batch pos": None,
        "Precision": request.precision,
        "Version": f"sdgen {__version__}",
    }


@dataclass
class RunOutput:
    """Where and how a run's images are written.

    ``settings``: the PNG parameters line (:func:`png_settings`); ``per_image``: extra PNG entries of one image
    (e.g. unclip-variate's "Init image"); ``n_rows``: images per grid row.
    """

    out: OutputFolder
    safety: Any  # ldm.safety.postprocess.OutputSafety
    settings: dict[str, Any]
    negative_prompt: str = ""
    skip_save: bool = False
    skip_grid: bool = False
    n_rows: int = 1
    per_image: Optional[Callable[[ImageJob], Mapping[str, Any]]] = None


def run_output(out: OutputFolder, safety: Any, settings: dict[str, Any], opts: RunOptions,
               per_image: Optional[Callable[[ImageJob], Mapping[str, Any]]] = None) -> RunOutput:
    """The :class:`RunOutput` of a run from its shared flags (negative prompt, skip flags, grid rows)."""
    return RunOutput(out, safety, settings, opts.negative_prompt, opts.skip_save, opts.skip_grid,
                     opts.n_rows or opts.n_samples, per_image)


def output_safety(opts: RunOptions, model_config: Any, device: torch.device) -> Any:
    """The run's safety checker and watermark from its flags (:meth:`ldm.safety.postprocess.OutputSafety.resolve`)."""
    from ldm.safety.postprocess import OutputSafety

    return OutputSafety.resolve(opts.safety_checker, disabled=opts.no_safety_checker, watermark=opts.watermark,
                                model_config=model_config, device=device)


def recorded_options(opts: RunOptions, out: OutputFolder, **changes: Any) -> Any:
    """``opts`` as a run manifest records them: the output folder and the shared input files as absolute paths,
    no prompt list (the manifest holds the prompts); ``changes``: the command's own resolved values."""
    return replace(opts, outdir=str(out.root.resolve()), from_file=absolute(opts.from_file),
                   init_img=absolute(opts.init_img), safety_checker=absolute(opts.safety_checker), prompt_list=None,
                   **changes)


Generation = Callable[[StepCallback, BatchCallback], Iterable[GeneratedImage]]


def write_run(generation: Generation, jobs: list[list[ImageJob]], header: Mapping[str, Any],
              output: RunOutput) -> RunResult:
    """Run ``generation(on_step, on_batch)`` and write what it yields; the one output loop of every command.

    Each image is saved (watermarked) with its parameters as soon as it comes, and recorded in the manifest
    (``header`` plus the safety settings), which is rewritten after every image; flagged images are reported.
    A Ctrl-C finishes the manifest as "interrupted" and raises :class:`RunInterrupted` (the written images
    stay); any other error finishes it as "failed". The grid (watermarked) is written last.
    """
    out, safety = output.out, output.safety
    manifest = RunManifest(out.manifest_path, {**header, "safety": safety.manifest()})
    samples: list[Path] = []
    grid_images: list[np.ndarray] = []
    first_parameters: Optional[str] = None
    batch_sizes = {job.batch: len(batch) for batch in jobs for job in batch}
    total = sum(len(batch) for batch in jobs)
    with progress_bar() as progress:
        batch_task = progress.add_task("batches", total=len(jobs))
        steps_task = progress.add_task("steps", total=None)

        def on_step(done: int, steps: int) -> None:
            progress.update(steps_task, completed=done, total=steps)

        def on_batch(batch: list[ImageJob]) -> None:
            progress.update(steps_task, completed=0)

        try:
            for image in generation(on_step, on_batch):
                job = image.job
                parameters = format_parameters(job.prompt, output.negative_prompt, {
                    **output.settings, "Seed": job.seed, "Batch size": batch_sizes[job.batch],
                    "Batch pos": job.position, **(output.per_image(job) if output.per_image else {}),
                    **safety.png_settings(image.flagged),
                })
                first_parameters = first_parameters or parameters
                file, digest = None, None
                if not output.skip_save:
                    path, digest = out.save_sample(safety.mark(image.pixels), parameters)
                    samples.append(path)
                    file = relative_to(path, out.root)
                if image.flagged:
                    logger.warning("the safety checker flagged image %d (seed %d)%s; it is saved black",
                                   job.index, job.seed, f" ({file})" if file else "")
                if not output.skip_grid:
                    grid_images.append(image.pixels)
                manifest.add_image(ImageRecord(job.index, job.seed, job.prompt, file, digest))
                if job.position == batch_sizes[job.batch] - 1:
                    progress.advance(batch_task)
        except KeyboardInterrupt:
            manifest.finish("interrupted")
            raise RunInterrupted(
                f"interrupted: kept {manifest.image_count} of {total} images in {out.root} "
                f"(manifest {out.manifest_path.name})"
            ) from None
        except BaseException:
            manifest.finish("failed")
            raise

    grid = None
    if grid_images:
        grid = out.save_grid(grid_images, output.n_rows, first_parameters, postprocess=safety.mark)
    manifest.finish("complete", grid)
    return RunResult(outdir=out.root, samples=samples, grid=grid, manifest=out.manifest_path)


# ----------------------------------------------------------------------------- txt2img / img2img


@dataclass
class RunPlan:
    """A checked run, before the model is loaded: what to load, what to generate, where to write.

    ``opts`` has the model family's defaults filled in; ``sdxl`` says whether the config builds an SDXL
    ``DiffusionEngine``.
    """

    opts: GenerateOptions
    files: ModelFiles
    config: Any
    request: GenerationRequest
    prompts: list[str]
    out: OutputFolder
    device: torch.device
    checkpoint_sha256: str
    init_sha256: Optional[str]
    sdxl: bool = False


def resolve_sampling_defaults(opts: GenerateOptions, config: Any, sdxl: bool) -> GenerateOptions:
    """``opts`` with its unset sampling fields (steps, sampler, scale, size, n_iter, SDXL grid) set to the model
    family's defaults: the SGM demo's for SDXL (:func:`ldm.sdxl_pipeline.sdxl_sampling_defaults`; n_iter as the
    original script), else the original script's (:data:`ldm.cli.options.COMPVIS_DEFAULTS`) updated with the
    config's ``sampling_defaults``. img2img keeps an unset size (the init image's)."""
    if sdxl:
        from ldm.sdxl_pipeline import sdxl_sampling_defaults

        defaults = sdxl_sampling_defaults(config)
        defaults = {k: defaults[k] for k in ("sampler", "steps", "scale", "height", "width", "grid")}
        defaults["n_iter"] = COMPVIS_DEFAULTS.get(opts.command, COMPVIS_DEFAULTS["txt2img"])["n_iter"]
    else:
        defaults = dict(COMPVIS_DEFAULTS.get(opts.command, COMPVIS_DEFAULTS["txt2img"]))
        own = config.get("sampling_defaults", None) if hasattr(config, "get") else None
        if own:  # a config's own defaults (the bundled demo model: 64x64, fewer steps, one iteration)
            keys = ("sampler", "steps", "scale", "height", "width", "n_iter")
            defaults.update({k: v for k, v in dict(own).items() if k in keys})
    if opts.command == "img2img":
        defaults.pop("height", None)
        defaults.pop("width", None)
    return replace(opts, **{k: v for k, v in defaults.items() if getattr(opts, k) is None})


def check_family(opts: GenerateOptions, config: Any, sdxl: bool) -> None:
    """The checks that depend on the model family: SDXL flags only for SDXL, SLD not for SDXL, and a step count /
    strength the family's grid accepts (raises SdgenError)."""
    if not sdxl:
        given = [flag for name, flag in SDXL_FIELDS.items() if getattr(opts, name) is not None]
        if given:
            raise SdgenError(f"{', '.join(given)} apply to SDXL models only; this config is not an SDXL one")
        check_sampler_grid(config, opts.sampler, opts.steps)
        if opts.command == "img2img" and int(opts.strength * opts.steps) < 1:
            raise SdgenError(
                f"--strength {opts.strength} with {opts.steps} steps leaves no denoising step "
                "(int(strength * steps) must be at least 1)"
            )
        return
    from ldm.sdxl_pipeline import config_sigmas, sdedit_sigmas

    if opts.sld is not None:
        raise SdgenError("Safe Latent Diffusion runs SD 1.x / 2.x models; this config is an SDXL one")
    if opts.steps > 1000:
        raise SdgenError(f"--steps must be at most 1000 (the training timesteps), got {opts.steps}")
    sigmas, _ = config_sigmas(config, opts.steps, opts.grid)
    if opts.command == "img2img":
        sdedit_sigmas(sigmas, opts.strength)


def check_geometry(config: Any, opts: Any) -> int:
    """``--f`` / ``--C`` / ``--H`` / ``--W`` of ``opts`` against the config (raises SdgenError); returns the VAE
    downsampling factor."""
    vae_factor = vae_downsampling_factor(config)
    if opts.factor is not None and opts.factor != vae_factor:
        raise SdgenError(f"--f {opts.factor} does not match the config's VAE downsampling factor {vae_factor}")
    in_channels = unet_in_channels(config)
    if in_channels is not None and opts.latent_channels != in_channels:
        raise SdgenError(f"--C {opts.latent_channels} does not match the config's {in_channels} latent channels")
    multiple = latent_size_multiple(config)
    for flag, value in (("--H", opts.height), ("--W", opts.width)):
        if value is not None and value % multiple:
            raise SdgenError(
                f"{flag} {value} must be a multiple of {multiple} for this model "
                f"(VAE factor {vae_factor} x UNet downsampling {multiple // vae_factor})"
            )
    return vae_factor


def plan_run(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (raises SdgenError)."""
    from ldm.checkpoint import check_checkpoint_file, file_sha256, load_model_config
    from ldm.sdxl_pipeline import is_sdxl_config

    check_options(opts)
    prompts = read_prompts(opts)
    init_pil = read_image(opts.init_img) if opts.command == "img2img" else None
    files = resolve_checkpoint(opts.ckpt, opts.config)
    check_checkpoint_file(files.checkpoint)
    config = load_model_config(files.config)
    sdxl = is_sdxl_config(config)
    opts = resolve_sampling_defaults(opts, config, sdxl)
    check_options(opts)
    check_family(opts, config, sdxl)

    vae_factor = check_geometry(config, opts)
    multiple = latent_size_multiple(config)

    init_tensor = None
    height, width = opts.height, opts.width
    if init_pil is not None:
        init_tensor = fit_init_image(init_pil, opts.height, opts.width, multiple)
        height, width = int(init_tensor.shape[1]), int(init_tensor.shape[2])
    if height is None or width is None:
        raise SdgenError("--H and --W are needed without an init image")

    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    ckpt_sha = file_sha256(files.checkpoint)
    init_sha = file_sha256(opts.init_img) if init_tensor is not None else None
    check_expectations(expect, {"checkpoint_sha256": ckpt_sha, "init_image_sha256": init_sha})

    per_image = opts.from_file is not None or opts.prompt_list is not None
    request = GenerationRequest(
        batches=prompt_batches(prompts, opts.n_samples, per_image=per_image),
        n_iter=opts.n_iter,
        negative_prompt=opts.negative_prompt,
        sampler=opts.sampler,
        steps=opts.steps,
        scale=opts.scale,
        eta=opts.eta,
        height=height,
        width=width,
        latent_channels=opts.latent_channels,
        factor=vae_factor,
        seed=opts.seed,
        fixed_code=opts.fixed_code,
        init_image=init_tensor,
        strength=opts.strength,
        precision=opts.precision,
    )
    return RunPlan(opts, files, config, request, prompts, out, device, ckpt_sha, init_sha, sdxl)


def manifest_header(plan: RunPlan, **extra: Any) -> dict[str, Any]:
    """The manifest's description of a run (everything ``sdgen replay`` needs)."""
    opts, files = plan.opts, plan.files
    recorded = replace(opts, outdir=str(plan.out.root.resolve()), config=str(files.config),
                       ckpt=str(files.checkpoint), from_file=absolute(opts.from_file),
                       init_img=absolute(opts.init_img), safety_checker=absolute(opts.safety_checker),
                       prompt_list=None)
    return run_header(
        opts.command, plan.device, recorded.to_dict(),
        model_record(files.config, files.checkpoint, plan.checkpoint_sha256), plan.request, plan.prompts,
        opts.from_file is not None or opts.prompt_list is not None,
        init_image={"path": recorded.init_img, "sha256": plan.init_sha256} if plan.init_sha256 else None,
        **extra,
    )


def image_settings(plan: RunPlan, extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The PNG parameters line of a txt2img / img2img run (:func:`png_settings`)."""
    opts, request = plan.opts, plan.request
    return png_settings(request, plan.files.checkpoint, plan.checkpoint_sha256, {
        "Denoising strength": opts.strength if request.init_image is not None else None,
        "Eta": opts.eta if opts.sampler == "ddim" else None,
        **dict(extra),
    })


def sdxl_records(model: Any, request: GenerationRequest, settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest entries, PNG settings) of an SDXL run on one model: its stages and micro-conditioning."""
    from ldm.sdxl_pipeline import plan_stages, stage_summary

    stages = plan_stages(request, settings, base=model)
    micro = stages[0].micro
    png = {
        "Schedule": settings.grid,
        "Original size": "{},{}".format(*micro.original_size),
        "Crop": "{},{}".format(*micro.crop_coords),
        "Target size": None if model.is_refiner else "{},{}".format(*micro.target_size),
        "Aesthetic score": (f"{micro.aesthetic_score}/{micro.negative_aesthetic_score}" if model.is_refiner
                            else None),
    }
    return {"stages": stage_summary(stages)}, png


def execute(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunResult:
    """Run a txt2img / img2img / safe-txt2img command from its options; ``expect`` holds hashes a replay must
    find. An SDXL model runs through :func:`ldm.sdxl_pipeline.generate_sdxl`, any other through
    :func:`ldm.pipelines.generate`."""
    from ldm.checkpoint import load_model
    from ldm.models.diffusion.engine import DiffusionEngine
    from ldm.safety.postprocess import OutputSafety
    from ldm.sampling.sld import SLDGuidance
    from ldm.sdxl_pipeline import generate_sdxl, load_dtype

    plan = plan_run(opts, expect=expect)
    opts, request = plan.opts, plan.request
    safety = OutputSafety.resolve(opts.safety_checker, disabled=opts.no_safety_checker, watermark=opts.watermark,
                                  model_config=plan.config, device=plan.device)
    guidance = SLDGuidance.from_record(opts.sld) if opts.sld else None
    dtype = load_dtype(opts.precision, plan.device) if plan.sdxl else None
    logger.info("loading %s with %s on %s", plan.files.checkpoint, plan.files.config, plan.device)
    model = load_model(plan.config, plan.files.checkpoint, device=plan.device, dtype=dtype)

    if isinstance(model, DiffusionEngine):
        settings = sdxl_settings(opts)
        manifest_extra, png_extra = sdxl_records(model, request, settings)

        def generation(on_step: StepCallback, on_batch: BatchCallback) -> Iterable[GeneratedImage]:
            return generate_sdxl(request, settings, base=model, on_step=on_step, on_batch=on_batch,
                                 safety_checker=safety.checker)
    else:
        manifest_extra, png_extra = {}, (guidance.png_settings(opts.scale) if guidance else {})

        def generation(on_step: StepCallback, on_batch: BatchCallback) -> Iterable[GeneratedImage]:
            return pipelines.generate(model, request, on_step=on_step, on_batch=on_batch, guidance=guidance,
                                      safety_checker=safety.checker)

    output = RunOutput(plan.out, safety, image_settings(plan, png_extra), opts.negative_prompt, opts.skip_save,
                       opts.skip_grid, opts.n_rows or opts.n_samples)
    return write_run(generation, request.jobs(), manifest_header(plan, **manifest_extra), output)


def options_from_manifest(data: Mapping[str, Any], outdir: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[GenerateOptions, dict[str, Any]]:
    """(options, expected hashes) to run a recorded txt2img / img2img / safe-txt2img run again."""
    from ldm.cli.output import options_from_record

    opts = options_from_record(GenerateOptions, data, outdir, device)
    expect = {"checkpoint_sha256": (data.get("model") or {}).get("checkpoint_sha256"),
              "init_image_sha256": (data.get("init_image") or {}).get("sha256")}
    return opts, expect
