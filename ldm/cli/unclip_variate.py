"""``sdgen unclip-variate``: image variations with Stable unCLIP (SD 2.1 unCLIP-L / -H).

The init image's CLIP embedding, noise-augmented to ``--noise-level``, conditions the UNet through its ADM input;
an optional ``--prompt`` mixes in text. Guidance runs jointly on text and image: the unconditional branch has
the negative prompt and an all-zero ADM vector (SAI2 ``scripts/streamlit/stableunclip.py``). Defaults are the
streamlit demo's: 20 DDIM steps (eta 0), scale 10.0, noise level 0, 768 x 768, 2 samples x 2 runs, seed 42.

``--init-img`` takes one image or a folder of images (each gets its own variations); the output layout, PNG
parameters, run manifest, safety checker and watermark are those of txt2img (:func:`ldm.cli.run.write_run`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

import typer

from ldm.cli import options as o
from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

COMMAND = "unclip-variate"
DEFAULT_CKPT = "checkpoints/sd21-unclip-l.ckpt"  # the streamlit demo's path (SAI2 scripts/streamlit/stableunclip.py)
DEFAULT_OUTDIR = "outputs/unclip-samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
INPUT_MULTIPLE = 64  # the demo resizes the input down to multiples of 64 (LANCZOS) before embedding it


@dataclass(kw_only=True)
class UnclipOptions(o.GenerateOptions):
    """The flags of ``unclip-variate`` (the txt2img ones plus the unCLIP ones), stored in the run manifest.

    ``init_img`` is one image file or a folder; ``noise_level`` in 0..999; ``clip_stats`` Karlo's
    ``ViT-L-14_stats.th`` (unCLIP-L); ``embedder_ckpt`` the CLIP weights when the checkpoint lacks them.
    The sampling defaults are the streamlit demo's.
    """

    prompt: str = ""
    outdir: str = DEFAULT_OUTDIR
    steps: Optional[int] = 20
    sampler: Optional[str] = "ddim"
    n_samples: int = 2
    scale: Optional[float] = 10.0
    height: Optional[int] = 768
    width: Optional[int] = 768
    noise_level: int = 0
    clip_stats: Optional[str] = None
    embedder_ckpt: Optional[str] = None


def init_image_paths(path: Optional[str]) -> list[Path]:
    """The init images: the file itself, or the image files of a folder (sorted by name)."""
    if not path:
        raise SdgenError("unclip-variate needs an input image: pass --init-img PATH (an image or a folder of images)")
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SdgenError(f"the folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    if not p.is_file():
        raise SdgenError(f"init image not found: {p}")
    return [p]


def check_unclip_options(opts: UnclipOptions) -> None:
    """The checks of txt2img plus the unCLIP ones (raises SdgenError)."""
    from ldm.cli.run import check_options

    check_options(opts)
    if not 0 <= opts.noise_level <= 999:
        raise SdgenError(f"--noise-level must be in 0..999 (the augmentor's 1000 noise levels), got {opts.noise_level}")
    for flag, value in (("--clip-stats", opts.clip_stats), ("--embedder-ckpt", opts.embedder_ckpt)):
        if value is not None and not Path(value).expanduser().is_file():
            raise SdgenError(f"{flag} file not found: {value}")


def _batches(prompts: list[str], n_samples: int, per_image_prompts: bool, n_images: int) -> tuple[list, int]:
    """Batches of one iteration, init image by init image, and how many batches each init image has."""
    from ldm.pipelines import prompt_batches

    per_init = prompt_batches(prompts, n_samples, per_image=per_image_prompts)
    return [list(batch) for _ in range(n_images) for batch in per_init], len(per_init)


def execute_unclip(
    opts: UnclipOptions,
    *,
    expect: Optional[Mapping[str, Any]] = None,
    notify: Callable[[str], None] = logger.warning,
):
    """Run ``unclip-variate`` from its options; returns :class:`ldm.cli.run.RunResult`.

    ``expect`` holds hashes a replay must find (``checkpoint_sha256``, ``init_image_sha256`` list); ``notify``
    receives the one-line notices of the run (unCLIP-L without its statistics).
    """
    from ldm import pipelines
    from ldm.checkpoint import CONFIG_UNCLIP_L, bundled_config, file_sha256, guess_config, load_model_config, read_state_dict
    from ldm.cli.output import OutputFolder
    from ldm.cli.run import (
        absolute,
        check_expectations,
        check_geometry,
        model_record,
        output_safety,
        png_settings,
        read_prompts,
        recorded_options,
        resolve_device,
        resolve_sampling_defaults,
        run_header,
        run_output,
        write_run,
    )
    from ldm.models.diffusion.unclip import (
        UNCLIP_FILES_HINT,
        ImageVariationConditioning,
        is_unclip_config,
        is_unclip_state_dict,
        load_unclip_model,
        missing_clip_stats_notice,
        unclip_config_for,
    )
    check_unclip_options(opts)
    prompts = read_prompts(opts)
    init_paths = init_image_paths(opts.init_img)
    init_tensors = [pipelines.image_to_tensor(pipelines.read_image(p), None, INPUT_MULTIPLE) for p in init_paths]

    files = pipelines.resolve_checkpoint(opts.ckpt or DEFAULT_CKPT, opts.config or str(bundled_config(CONFIG_UNCLIP_L)))
    if opts.config is not None and not is_unclip_config(load_model_config(files.config)):
        raise SdgenError(f"--config {opts.config} is not a Stable unCLIP config; {UNCLIP_FILES_HINT}")
    state_dict = read_state_dict(files.checkpoint)
    if not is_unclip_state_dict(state_dict):
        guess = guess_config(state_dict)
        looks = f" (it looks like a model for {guess})" if guess else ""
        raise SdgenError(f"--ckpt {opts.ckpt or DEFAULT_CKPT} is not a Stable unCLIP checkpoint{looks}; "
                         f"{UNCLIP_FILES_HINT}")
    if opts.config is not None:
        config_path = files.config
    else:
        bundled = unclip_config_for(state_dict)
        if bundled is None:
            raise SdgenError(f"cannot tell which unCLIP config {files.checkpoint} needs: pass --config")
        config_path = bundled_config(bundled)
    config = load_model_config(config_path)
    opts = resolve_sampling_defaults(opts, config, sdxl=False)
    factor = check_geometry(config, opts)

    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    ckpt_sha = file_sha256(files.checkpoint)
    init_shas = [file_sha256(p) for p in init_paths]
    check_expectations(expect, {"checkpoint_sha256": ckpt_sha, "init_image_sha256": init_shas})

    batches, batches_per_init = _batches(prompts, opts.n_samples, opts.per_image_prompts, len(init_paths))
    request = pipelines.GenerationRequest(
        batches=batches, n_iter=opts.n_iter, negative_prompt=opts.negative_prompt, sampler=opts.sampler,
        steps=opts.steps, scale=opts.scale, eta=opts.eta, height=opts.height, width=opts.width,
        latent_channels=opts.latent_channels, factor=factor, seed=opts.seed, fixed_code=opts.fixed_code,
        precision=opts.precision,
    )
    jobs = request.jobs()

    def init_of(batch_jobs) -> int:
        return (batch_jobs[0].batch % len(batches)) // batches_per_init

    safety = output_safety(opts, config, device)
    logger.info("loading %s with %s on %s", files.checkpoint, config_path, device)
    model = load_unclip_model(str(config_path), files.checkpoint, state_dict=state_dict,
                              embedder_ckpt=opts.embedder_ckpt, clip_stats=opts.clip_stats, device=device)
    notice = missing_clip_stats_notice(model)
    if notice:
        notify(notice)
    conditioner = ImageVariationConditioning(model, [t.to(device) for t in init_tensors], opts.noise_level,
                                             image_of_batch=init_of)

    recorded = recorded_options(opts, out, config=str(config_path), ckpt=str(files.checkpoint),
                                clip_stats=absolute(opts.clip_stats), embedder_ckpt=absolute(opts.embedder_ckpt))
    header = run_header(
        COMMAND, device, recorded.to_dict(),
        model_record(config_path, files.checkpoint, ckpt_sha,
                     clip_stats_sha256=file_sha256(opts.clip_stats) if opts.clip_stats else None,
                     embedder_ckpt_sha256=file_sha256(opts.embedder_ckpt) if opts.embedder_ckpt else None),
        request, prompts, opts.per_image_prompts,
        init_images=[{"path": str(p.resolve()), "sha256": h} for p, h in zip(init_paths, init_shas)],
        init_image_of=[init_of(batch) for batch in jobs for _ in batch],
        noise_level=opts.noise_level,
        notices=[notice] if notice else [],
    )
    settings = png_settings(request, files.checkpoint, ckpt_sha, {
        "Noise level": opts.noise_level, "Init image": None, "Eta": opts.eta if opts.sampler == "ddim" else None,
    })
    sources = {batch[0].batch: init_paths[init_of(batch)].name for batch in jobs}

    def generation(on_step, on_batch):
        return pipelines.generate(model, request, on_step=on_step, on_batch=on_batch, conditioner=conditioner,
                                  safety_checker=safety.checker)

    output = run_output(out, safety, settings, opts, per_image=lambda job: {"Init image": sources[job.batch]})
    return write_run(generation, jobs, header, output)


def options_from_manifest(data: Mapping[str, Any], outdir: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[UnclipOptions, dict[str, Any]]:
    """(options, expected hashes) to run a recorded ``unclip-variate`` run again (for ``sdgen replay``)."""
    from ldm.cli.output import options_from_record

    if data.get("command") != COMMAND:
        raise SdgenError(f"not an {COMMAND} run manifest (command {data.get('command')!r})")
    opts = options_from_record(UnclipOptions, data, outdir, device)
    expect = {
        "checkpoint_sha256": (data.get("model") or {}).get("checkpoint_sha256"),
        "init_image_sha256": [entry["sha256"] for entry in data.get("init_images", [])],
    }
    return opts, expect


NoiseLevel = Annotated[
    int, typer.Option("--noise-level", "--noise_level", help="noise augmentation of the image embedding, 0..999 "
                      "(0: closest to the input image; higher: more varied)")]
ClipStats = Annotated[
    Optional[str], typer.Option("--clip-stats", "--clip_stats", show_default=False,
                                help="Karlo's ViT-L-14_stats.th (CLIP-L embedding mean/std) for unCLIP-L")]
EmbedderCkpt = Annotated[
    Optional[str], typer.Option("--embedder-ckpt", "--embedder_ckpt", show_default=False,
                                help="CLIP weights of the image embedder, for a checkpoint saved without them")]
UnclipCkpt = Annotated[
    Optional[str], typer.Option("--ckpt", show_default=DEFAULT_CKPT,
                                help="sd21-unclip-l.ckpt or sd21-unclip-h.ckpt (or .safetensors copies)")]
UnclipConfig = Annotated[
    Optional[str], typer.Option("--config", show_default="picked from the checkpoint (unCLIP-L or -H)",
                                help="model config (YAML)")]
InitImages = Annotated[
    Optional[str], typer.Option("--init-img", "--init_img", show_default=False,
                                help="the input image, or a folder of images (each gets its own variations)")]
UnclipPrompt = Annotated[Optional[str], typer.Option("--prompt", help="text mixed into the variations "
                                                     "(default: none, the image embedding alone)")]


def unclip_variate(
    prompt_arg: o.PromptArg = None,
    prompt: UnclipPrompt = None,
    init_img: InitImages = None,
    noise_level: NoiseLevel = 0,
    negative_prompt: o.NegativePrompt = "",
    from_file: o.FromFile = None,
    outdir: o.Outdir = DEFAULT_OUTDIR,
    skip_grid: o.SkipGrid = False,
    skip_save: o.SkipSave = False,
    steps: o.Steps = 20,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.SDSampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.NIter = 2,
    height: o.Height = 768,
    width: o.Width = 768,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 2,
    n_rows: o.NRows = 0,
    scale: o.Scale = 10.0,
    seed: o.Seed = 42,
    fixed_code: o.FixedCode = False,
    config: UnclipConfig = None,
    ckpt: UnclipCkpt = None,
    clip_stats: ClipStats = None,
    embedder_ckpt: EmbedderCkpt = None,
    precision: o.PrecisionOpt = o.Precision.autocast,
    device: o.Device = "auto",
    safety_checker: o.SafetyCheckerPath = None,
    no_safety_checker: o.NoSafetyChecker = False,
    no_watermark: o.NoWatermark = False,
) -> None:
    """Make variations of an image (or of each image in a folder) with Stable unCLIP (SD 2.1 unCLIP-L / -H)."""
    from ldm.cli.txt2img import report

    options = o.options_from_flags(UnclipOptions, COMMAND, locals(), prompt=o.prompt_from(prompt_arg, prompt, ""))
    report(execute_unclip(options, notify=lambda message: typer.echo(f"sdgen: warning: {message}", err=True)))
