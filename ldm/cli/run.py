"""One txt2img / img2img run: options -> early checks -> model -> :func:`ldm.pipelines.generate` -> files.

Everything a user can get wrong is checked before the model is loaded (numbers, prompt file, init image,
config and checkpoint paths, output folder), each failing with one :class:`~ldm.errors.SdgenError` line.
Images are written as soon as their batch is decoded and the manifest is rewritten after each one, so a
Ctrl-C keeps everything finished so far.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ldm import __version__
from ldm.cli.options import GenerateOptions
from ldm.cli.output import (
    ImageRecord,
    OutputFolder,
    RunManifest,
    format_parameters,
    make_grid,
    relative_to,
    save_png,
)
from ldm.errors import SdgenError
from ldm import pipelines
from ldm.pipelines import (
    PRECISIONS,
    GenerationRequest,
    ModelFiles,
    check_sampler_grid,
    image_to_tensor,
    prompt_batches,
    read_image,
    resolve_checkpoint,
    unet_in_channels,
    unet_size_multiple,
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
    """Validate the flags that need no file (raises SdgenError)."""
    from ldm.sampling.samplers import SAMPLERS

    if opts.steps < 1:
        raise SdgenError(f"--steps must be at least 1, got {opts.steps}")
    for flag, value in (("--n_samples", opts.n_samples), ("--n_iter", opts.n_iter), ("--C", opts.latent_channels)):
        if value < 1:
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
    if opts.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.eta < 0:
        raise SdgenError(f"--ddim_eta must be >= 0, got {opts.eta}")
    if opts.sampler == "plms" and opts.eta != 0:
        raise SdgenError("PLMS is deterministic: --ddim_eta must be 0 with --plms")
    if opts.precision not in PRECISIONS:
        raise SdgenError(f"unknown --precision {opts.precision!r} ({', '.join(PRECISIONS)})")
    if opts.command == "img2img":
        if not opts.init_img:
            raise SdgenError("img2img needs an input image: pass --init-img PATH")
        if not 0.0 < opts.strength <= 1.0:
            raise SdgenError(f"--strength must be in (0, 1], got {opts.strength}")
        if int(opts.strength * opts.steps) < 1:
            raise SdgenError(
                f"--strength {opts.strength} with {opts.steps} steps leaves no denoising step "
                "(int(strength * steps) must be at least 1)"
            )


def read_prompts(opts: GenerateOptions) -> list[str]:
    """The run's prompts: ``prompt_list`` (replay), the lines of ``--from-file``, or the single prompt."""
    if opts.prompt_list is not None:
        return list(opts.prompt_list)
    if opts.from_file is None:
        return [opts.prompt]
    path = Path(opts.from_file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SdgenError(f"cannot read the prompt file {path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise SdgenError(f"cannot read the prompt file {path}: {exc.strerror or exc}") from exc
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


# ----------------------------------------------------------------------------- the run


def _progress() -> Progress:
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


@dataclass
class RunPlan:
    """A checked run, before the model is loaded: what to load, what to generate, where to write."""

    opts: GenerateOptions
    files: ModelFiles
    config: Any
    request: GenerationRequest
    prompts: list[str]
    out: OutputFolder
    device: torch.device
    checkpoint_sha256: str
    init_sha256: Optional[str]


def plan_run(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (raises SdgenError)."""
    from ldm.checkpoint import file_sha256, load_config

    check_options(opts)
    prompts = read_prompts(opts)
    init_pil = read_image(opts.init_img) if opts.command == "img2img" and opts.init_img else None
    files = resolve_checkpoint(opts.ckpt, opts.config)
    config = load_config(files.config)

    check_sampler_grid(config, opts.sampler, opts.steps)
    vae_factor = vae_downsampling_factor(config)
    if opts.factor is not None and opts.factor != vae_factor:
        raise SdgenError(f"--f {opts.factor} does not match the config's VAE downsampling factor {vae_factor}")
    in_channels = unet_in_channels(config)
    if in_channels is not None and opts.latent_channels != in_channels:
        raise SdgenError(f"--C {opts.latent_channels} does not match the config's {in_channels} latent channels")
    multiple = vae_factor * unet_size_multiple(config)
    for flag, value in (("--H", opts.height), ("--W", opts.width)):
        if value is not None and value % multiple:
            raise SdgenError(
                f"{flag} {value} must be a multiple of {multiple} for this model "
                f"(VAE factor {vae_factor} x UNet downsampling {multiple // vae_factor})"
            )

    init_tensor = None
    height, width = opts.height, opts.width
    if init_pil is not None:
        size = None
        if opts.height is not None or opts.width is not None:
            size = (opts.width or init_pil.width - init_pil.width % multiple,
                    opts.height or init_pil.height - init_pil.height % multiple)
        init_tensor = image_to_tensor(init_pil, size, multiple)
        height, width = int(init_tensor.shape[1]), int(init_tensor.shape[2])
    if height is None or width is None:
        raise SdgenError("--H and --W are needed without an init image")

    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    ckpt_sha = file_sha256(files.checkpoint)
    init_sha = file_sha256(opts.init_img) if init_pil is not None else None
    _check_expectations(expect, ckpt_sha, init_sha)

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
    return RunPlan(opts, files, config, request, prompts, out, device, ckpt_sha, init_sha)


def manifest_header(plan: RunPlan) -> dict[str, Any]:
    """The manifest's description of a run (everything ``sdgen replay`` needs)."""
    from ldm.checkpoint import file_sha256

    opts, files, request = plan.opts, plan.files, plan.request
    recorded = replace(
        opts,
        outdir=str(plan.out.root.resolve()),
        config=str(files.config),
        ckpt=str(files.checkpoint),
        from_file=str(Path(opts.from_file).resolve()) if opts.from_file else None,
        init_img=str(Path(opts.init_img).resolve()) if opts.init_img else None,
        prompt_list=None,
    )
    return {
        "command": opts.command,
        "versions": {"sdgen": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(plan.device),
        "options": recorded.to_dict(),
        "model": {
            "config": str(files.config),
            "config_sha256": file_sha256(files.config),
            "checkpoint": str(files.checkpoint),
            "checkpoint_sha256": plan.checkpoint_sha256,
            "model_hash": plan.checkpoint_sha256[:10],
        },
        "init_image": {"path": recorded.init_img, "sha256": plan.init_sha256} if plan.init_sha256 else None,
        "prompts": plan.prompts,
        "per_image_prompts": opts.from_file is not None or opts.prompt_list is not None,
        "sampler": opts.sampler,
        "steps": opts.steps,
        "size": [request.width, request.height],
        "seeds": [job.seed for batch in request.jobs() for job in batch],
    }


def image_settings(plan: RunPlan) -> dict[str, Any]:
    """The ``Key: value`` line of the PNG parameters; per-image keys (Seed, Batch size/pos) are None here."""
    opts, request = plan.opts, plan.request
    return {
        "Steps": opts.steps,
        "Sampler": SAMPLER_LABELS.get(opts.sampler, opts.sampler),
        "CFG scale": opts.scale,
        "Seed": None,
        "Size": f"{request.width}x{request.height}",
        "Model hash": plan.checkpoint_sha256[:10],
        "Model": plan.files.checkpoint.stem,
        "Denoising strength": opts.strength if request.init_image is not None else None,
        "Eta": opts.eta if opts.sampler == "ddim" else None,
        "Batch size": None,
        "Batch pos": None,
        "Precision": opts.precision,
        "Version": f"sdgen {__version__}",
    }


def execute(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunResult:
    """Run a txt2img / img2img command from its options; ``expect`` holds hashes a replay must find."""
    from ldm.checkpoint import load_model

    from ldm.safety.postprocess import OutputSafety
    from ldm.sampling.sld import SLDGuidance

    plan = plan_run(opts, expect=expect)
    request, out = plan.request, plan.out
    safety = OutputSafety.resolve(opts.safety_checker, disabled=opts.no_safety_checker, watermark=opts.watermark,
                                  model_config=plan.config, device=plan.device)
    guidance = SLDGuidance.from_record(opts.sld) if opts.sld else None
    logger.info("loading %s with %s on %s", plan.files.checkpoint, plan.files.config, plan.device)
    model = load_model(plan.config, plan.files.checkpoint, device=plan.device)
    manifest = RunManifest(out.manifest_path, {**manifest_header(plan), "safety": safety.manifest()})
    settings = {**image_settings(plan), **(guidance.png_settings(opts.scale) if guidance else {})}
    jobs = request.jobs()

    samples: list[Path] = []
    grid_images: list[np.ndarray] = []
    first_parameters: Optional[str] = None
    batch_sizes = {job.batch: len(batch) for batch in jobs for job in batch}
    with _progress() as progress:
        batch_task = progress.add_task("batches", total=len(jobs))
        steps_task = progress.add_task("steps", total=None)

        def on_step(done: int, total: int) -> None:
            progress.update(steps_task, completed=done, total=total)

        def on_batch(batch: list[pipelines.ImageJob]) -> None:
            progress.update(steps_task, completed=0)

        try:
            for image in pipelines.generate(model, request, on_step=on_step, on_batch=on_batch,
                                            guidance=guidance, safety_checker=safety.checker):
                job = image.job
                parameters = format_parameters(job.prompt, opts.negative_prompt, {
                    **settings, "Seed": job.seed, "Batch size": batch_sizes[job.batch], "Batch pos": job.position,
                    **safety.png_settings(image.flagged),
                })
                first_parameters = first_parameters or parameters
                file, digest = None, None
                if not opts.skip_save:
                    path, digest = out.save_sample(safety.mark(image.pixels), parameters)
                    samples.append(path)
                    file = relative_to(path, out.root)
                if image.flagged:
                    logger.warning("the safety checker flagged image %d (seed %d)%s; it is saved black",
                                   job.index, job.seed, f" ({file})" if file else "")
                if not opts.skip_grid:
                    grid_images.append(image.pixels)
                manifest.add_image(ImageRecord(job.index, job.seed, job.prompt, file, digest))
                if job.position == batch_sizes[job.batch] - 1:
                    progress.advance(batch_task)
        except KeyboardInterrupt:
            manifest.finish("interrupted")
            raise RunInterrupted(
                f"interrupted: kept {manifest.image_count} of {request.num_images} images in {out.root} "
                f"(manifest {out.manifest_path.name})"
            ) from None
        except BaseException:
            manifest.finish("failed")
            raise

    grid = None
    if grid_images:
        grid = out.grid_path
        save_png(safety.mark(make_grid(grid_images, opts.n_rows or opts.n_samples)), grid, first_parameters)
    manifest.finish("complete", grid)
    return RunResult(outdir=out.root, samples=samples, grid=grid, manifest=out.manifest_path)


def _check_expectations(expect: Optional[Mapping[str, Any]], ckpt_sha: str, init_sha: Optional[str]) -> None:
    if not expect:
        return
    if expect.get("checkpoint_sha256") and expect["checkpoint_sha256"] != ckpt_sha:
        raise SdgenError("the checkpoint differs from the one the manifest recorded (sha256 mismatch)")
    if expect.get("init_image_sha256") and expect["init_image_sha256"] != init_sha:
        raise SdgenError("the init image differs from the one the manifest recorded (sha256 mismatch)")
