"""``sdgen sdxl-refine``: SDXL base -> refiner hand-over, or refiner SDEdit of an existing image.

    sdgen sdxl-refine --prompt P --ckpt sd_xl_base_0.9.safetensors --refiner-ckpt sd_xl_refiner_0.9.safetensors
    sdgen sdxl-refine --prompt P --init-img base_output.png --refiner-ckpt sd_xl_refiner_0.9.safetensors

The first runs the two-stage pipeline of the SDXL model card (the base denoises the noisiest
``--high-noise-frac`` of the timesteps, the refiner finishes the same latents with the same prompt and seed);
the second is the SGM 0.9 demo's refinement: img2img (SDEdit) on the refiner with ``--strength``. Defaults
are the SGM demo's: Euler, 50 steps, guidance 5.0, 1024 x 1024, seed 42. The micro-conditioning flags
(``--original-size`` ...) are shared with ``sdgen txt2img`` / ``img2img`` on an SDXL config
(:mod:`ldm.cli.options`), and so are the output, safety checker and watermark flags (:func:`ldm.cli.run.write_run`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from ldm.cli import options as o
from ldm.cli.txt2img import report
from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- the command's own flags

SChurn = Annotated[float, typer.Option("--s-churn", help="Euler/Heun churn S_churn (Karras et al. alg. 2; 0 = "
                                       "deterministic)")]
STmin = Annotated[float, typer.Option("--s-tmin", help="churn only for sigma >= s_tmin")]
STmax = Annotated[float, typer.Option("--s-tmax", help="churn only for sigma <= s_tmax")]
SNoise = Annotated[float, typer.Option("--s-noise", help="churn noise multiplier")]
RefineHeight = Annotated[Optional[int], o.size_option("height", "image {side} in pixels", o.SDXL_REFINER_SIZE_RULE,
                                                      "1024, or the init image's")]
RefineWidth = Annotated[Optional[int], o.size_option("width", "image {side} in pixels", o.SDXL_REFINER_SIZE_RULE,
                                                     "1024, or the init image's")]

CONFIG_BASE = "configs/sdxl/sd_xl_base.yaml"
CONFIG_REFINER = "configs/sdxl/sd_xl_refiner.yaml"
FILE_BASE = "sd_xl_base_0.9.safetensors"
FILE_REFINER = "sd_xl_refiner_0.9.safetensors"

# ----------------------------------------------------------------------------- options


@dataclass(kw_only=True)
class RefineOptions(o.RunOptions):
    """Everything an ``sdxl-refine`` run is made from (the flags, resolved), stored in the run manifest: the
    shared fields (:class:`~ldm.cli.options.RunOptions`) and the SDXL two-stage / SDEdit ones. ``ckpt`` is the
    base (two-stage mode), ``init_img`` the image to refine (SDEdit mode); ``high_noise_frac`` / ``strength``
    None mean the mode's default (:func:`resolve_defaults`)."""

    command: str = "sdxl-refine"
    prompt: str
    refiner_ckpt: Optional[str] = None
    config: str = CONFIG_BASE
    refiner_config: str = CONFIG_REFINER
    outdir: str = "outputs/sdxl-refine-samples"
    high_noise_frac: Optional[float] = None
    strength: Optional[float] = None
    steps: int = 50
    sampler: str = "euler"
    grid: str = "sgm"
    scale: float = 5.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 999.0
    s_noise: float = 1.0
    n_samples: int = 1
    n_iter: int = 1
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @property
    def two_stage(self) -> bool:
        return self.init_img is None


def resolve_defaults(opts: RefineOptions) -> RefineOptions:
    """Fill the mode's default: --high-noise-frac 0.8 (SDXL model card) for the hand-over, --strength 0.3 (SGM
    0.9 demo, diffusers' refiner) for --init-img."""
    from ldm.sdxl_pipeline import DEFAULT_HIGH_NOISE_FRAC, DEFAULT_REFINE_STRENGTH

    if opts.init_img is None and opts.ckpt is not None and opts.high_noise_frac is None:
        return replace(opts, high_noise_frac=DEFAULT_HIGH_NOISE_FRAC)
    if opts.init_img is not None and opts.strength is None:
        return replace(opts, strength=DEFAULT_REFINE_STRENGTH)
    return opts


def check_refine_options(opts: RefineOptions) -> None:
    """Validate the flags that need no file (raises SdgenError)."""
    from ldm.models.diffusion.engine import SDXL_GRIDS
    from ldm.pipelines import PRECISIONS
    from ldm.sampling.samplers import SAMPLERS
    from ldm.sdxl_pipeline import check_high_noise_frac

    if not opts.refiner_ckpt:
        raise SdgenError(f"sdxl-refine needs the refiner checkpoint: pass --refiner-ckpt {FILE_REFINER}")
    if opts.init_img and opts.ckpt:
        raise SdgenError("give either --ckpt (base -> refiner hand-over) or --init-img (refine an image), not both")
    if not opts.init_img and not opts.ckpt:
        raise SdgenError(f"pass --ckpt {FILE_BASE} (base -> refiner hand-over) or --init-img IMAGE (refine it)")
    if opts.two_stage:
        if opts.strength is not None:
            raise SdgenError("--strength applies to --init-img; the base -> refiner hand-over uses --high-noise-frac")
        check_high_noise_frac(opts.high_noise_frac)
    else:
        if opts.high_noise_frac is not None:
            raise SdgenError("--high-noise-frac applies to the base -> refiner hand-over (--ckpt), not to --init-img")
        if not 0.0 < opts.strength <= 1.0:
            raise SdgenError(f"--strength must be in (0, 1], got {opts.strength}")
    for flag, value in (("--steps", opts.steps), ("--n_samples", opts.n_samples), ("--n_iter", opts.n_iter)):
        if value < 1:
            raise SdgenError(f"{flag} must be at least 1, got {value}")
    if opts.steps > 1000:
        raise SdgenError(f"--steps must be at most 1000 (the training timesteps), got {opts.steps}")
    if opts.n_rows < 0:
        raise SdgenError(f"--n_rows must be 0 (= n_samples) or more, got {opts.n_rows}")
    for flag, value in (("--H", opts.height), ("--W", opts.width)):
        if value is not None and value <= 0:  # the multiple the models need is checked with their configs
            raise SdgenError(f"{flag} must be a positive number of pixels, got {value}")
    if opts.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.grid not in SDXL_GRIDS:
        raise SdgenError(f"unknown --grid {opts.grid!r} ({', '.join(SDXL_GRIDS)})")
    if opts.s_churn < 0 or opts.s_noise < 0:
        raise SdgenError("--s-churn and --s-noise must be >= 0")
    if opts.precision not in PRECISIONS:
        raise SdgenError(f"unknown --precision {opts.precision!r} ({', '.join(PRECISIONS)})")
    for flag, value in (("--original-size", opts.original_size), ("--crop-coords", opts.crop_coords),
                        ("--target-size", opts.target_size)):
        o.parse_pair(flag, value)


# ----------------------------------------------------------------------------- checkpoint roles


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint; for .safetensors only the header is read."""
    from ldm.checkpoint import is_safetensors, read_state_dict, safetensors_header
    from ldm.files import require_file

    if is_safetensors(require_file(path, "checkpoint")):
        return [key for key in safetensors_header(path) if key != "__metadata__"]
    return list(read_state_dict(path))


def check_checkpoint_role(path: Path, role: str, flag: str) -> None:
    """Refuse a checkpoint that is not an SDXL ``role`` ("base" | "refiner") file, saying which file is expected.

    The kind is recognised from the key names (:func:`ldm.checkpoint.guess_config`): the base has a CLIP-L
    embedder (``conditioner.embedders.0.transformer.*``), the refiner only the OpenCLIP one.
    """
    from ldm.checkpoint import CONFIG_SDXL_BASE, CONFIG_SDXL_REFINER, guess_config

    guess = guess_config(checkpoint_keys(path))
    expected_config, expected_file = (
        (CONFIG_SDXL_BASE, FILE_BASE) if role == "base" else (CONFIG_SDXL_REFINER, FILE_REFINER)
    )
    if guess == expected_config:
        return
    kinds = {CONFIG_SDXL_BASE: "the SDXL base", CONFIG_SDXL_REFINER: "the SDXL refiner"}
    if guess in kinds:
        other = "--ckpt" if guess == CONFIG_SDXL_BASE else "--refiner-ckpt"
        found = f"{kinds[guess]} checkpoint (pass it as {other})"
    elif guess is not None:
        found = f"not an SDXL checkpoint (it needs {guess}: use sdgen txt2img/img2img with that config)"
    else:
        found = "not a Stable Diffusion checkpoint sdgen recognises"
    raise SdgenError(f"{flag} {path.name} is {found}; {flag} expects the SDXL {role} file ({expected_file})")


# ----------------------------------------------------------------------------- the run


def execute_refine(opts: RefineOptions, *, expect: Optional[Mapping[str, Any]] = None):
    """Run ``sdxl-refine`` from its options; returns :class:`ldm.cli.run.RunResult`. ``expect`` holds hashes a
    replay must find (``checkpoint_sha256`` of the run's main model, ``refiner_checkpoint_sha256``,
    ``init_image_sha256``)."""
    from ldm.checkpoint import file_sha256, load_model, load_model_config
    from ldm.cli.output import OutputFolder
    from ldm.cli.run import (
        check_expectations,
        fit_init_image,
        model_record,
        output_safety,
        png_settings,
        read_prompts,
        recorded_options,
        resolve_device,
        run_header,
        run_output,
        write_run,
    )
    from ldm.models.diffusion.engine import DiffusionEngine
    from ldm.pipelines import (
        GenerationRequest,
        latent_size_multiple,
        prompt_batches,
        read_image,
        resolve_checkpoint,
        vae_downsampling_factor,
    )
    from ldm.sdxl_pipeline import generate_sdxl, load_dtype, plan_stages, stage_summary

    opts = resolve_defaults(opts)
    check_refine_options(opts)
    prompts = read_prompts(opts)
    refiner_files = resolve_checkpoint(opts.refiner_ckpt, opts.refiner_config)
    check_checkpoint_role(refiner_files.checkpoint, "refiner", "--refiner-ckpt")
    base_files = None
    if opts.two_stage:
        base_files = resolve_checkpoint(opts.ckpt, opts.config)
        check_checkpoint_role(base_files.checkpoint, "base", "--ckpt")
    refiner_config = load_model_config(refiner_files.config)
    base_config = load_model_config(base_files.config) if base_files else None
    check_schedule(base_config or refiner_config, opts)
    multiple = max(latent_size_multiple(c) for c in (refiner_config, base_config) if c is not None)
    factor = vae_downsampling_factor(refiner_config)

    init_tensor = None
    if opts.init_img:
        init_tensor = fit_init_image(read_image(opts.init_img), opts.height, opts.width, multiple)
        height, width = int(init_tensor.shape[1]), int(init_tensor.shape[2])
    else:
        height, width = opts.height or 1024, opts.width or 1024
    for flag, value in (("--H", height), ("--W", width)):
        if value % multiple:
            raise SdgenError(f"{flag} {value} must be a multiple of {multiple} for these SDXL models "
                             f"(VAE factor {factor} x UNet downsampling {multiple // factor})")

    settings = o.sdxl_settings(opts, opts.high_noise_frac if opts.two_stage else None)
    request = GenerationRequest(
        batches=prompt_batches(prompts, opts.n_samples, per_image=opts.per_image_prompts),
        n_iter=opts.n_iter, negative_prompt=opts.negative_prompt, sampler=opts.sampler, steps=opts.steps,
        scale=opts.scale, height=height, width=width, factor=factor,
        seed=opts.seed, fixed_code=opts.fixed_code, init_image=init_tensor,
        strength=opts.strength if opts.strength is not None else 1.0,
        precision=opts.precision,
        sampler_options=_sampler_options(opts),
    )
    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    dtype = load_dtype(opts.precision, device)
    refiner_sha = file_sha256(refiner_files.checkpoint)
    base_sha = file_sha256(base_files.checkpoint) if base_files else None
    init_sha = file_sha256(opts.init_img) if opts.init_img else None
    main_files, main_sha = (base_files, base_sha) if base_files else (refiner_files, refiner_sha)
    check_expectations(expect, {"checkpoint_sha256": main_sha, "refiner_checkpoint_sha256": refiner_sha,
                                "init_image_sha256": init_sha})
    safety = output_safety(opts, refiner_config, device)

    base = None
    if base_files is not None:
        logger.info("loading the base %s on %s (%s)", base_files.checkpoint, device, dtype)
        base = load_model(base_config, base_files.checkpoint, device=device, dtype=dtype)
    logger.info("loading the refiner %s on %s (%s)", refiner_files.checkpoint, device, dtype)
    refiner = load_model(refiner_config, refiner_files.checkpoint, device=device, dtype=dtype)
    for name, model in (("--ckpt", base), ("--refiner-ckpt", refiner)):
        if model is not None and not isinstance(model, DiffusionEngine):
            raise SdgenError(f"{name}: the config does not build an SDXL DiffusionEngine")
    stages = plan_stages(request, settings, base, refiner)

    recorded = recorded_options(opts, out, height=height, width=width,
                                ckpt=str(base_files.checkpoint) if base_files else None,
                                config=str(base_files.config) if base_files else opts.config,
                                refiner_ckpt=str(refiner_files.checkpoint), refiner_config=str(refiner_files.config))
    header = run_header(
        opts.command, device, recorded.to_dict(), model_record(main_files.config, main_files.checkpoint, main_sha),
        request, prompts, opts.per_image_prompts,
        refiner=model_record(refiner_files.config, refiner_files.checkpoint, refiner_sha),
        init_image={"path": recorded.init_img, "sha256": init_sha} if init_sha else None,
        stages=stage_summary(stages),
    )
    micro = stages[0].micro
    png = png_settings(request, main_files.checkpoint, main_sha, {
        "Schedule": opts.grid,
        "Denoising strength": opts.strength,
        "Refiner": f"{refiner_files.checkpoint.stem} [{refiner_sha[:10]}]" if base_files else None,
        "Refiner switch at": opts.high_noise_frac if base_files else None,
        "Original size": "{},{}".format(*micro.original_size),
        "Crop": "{},{}".format(*micro.crop_coords),
        "Target size": "{},{}".format(*micro.target_size) if base_files else None,
        "Aesthetic score": f"{opts.aesthetic_score}/{opts.negative_aesthetic_score}",
        "S churn": opts.s_churn or None,
    })

    def generation(on_step, on_batch):
        return generate_sdxl(request, settings, base=base, refiner=refiner, on_step=on_step, on_batch=on_batch,
                             safety_checker=safety.checker)

    return write_run(generation, request.jobs(), header, run_output(out, safety, png, opts))


def options_from_manifest(data: Mapping[str, Any], outdir: Optional[str] = None,
                          device: Optional[str] = None) -> tuple[RefineOptions, dict[str, Any]]:
    """(options, expected hashes) to run a recorded ``sdxl-refine`` run again (for ``sdgen replay``)."""
    from ldm.cli.output import options_from_record

    opts = options_from_record(RefineOptions, data, outdir, device)
    expect = {
        "checkpoint_sha256": (data.get("model") or {}).get("checkpoint_sha256"),
        "refiner_checkpoint_sha256": (data.get("refiner") or {}).get("checkpoint_sha256"),
        "init_image_sha256": (data.get("init_image") or {}).get("sha256"),
    }
    return opts, expect


def check_schedule(config: Any, opts: RefineOptions) -> None:
    """Refuse a step count / split / strength that leaves a model without a step, before any model is loaded
    (the grid comes from the config's discretization, as the loaded model would build it)."""
    from ldm.sdxl_pipeline import config_sigmas, sdedit_sigmas, split_sigmas

    sigmas, table = config_sigmas(config, opts.steps, opts.grid)
    if opts.two_stage:
        split_sigmas(sigmas, table, opts.high_noise_frac)
    else:
        sdedit_sigmas(sigmas, opts.strength)


def _sampler_options(opts: RefineOptions) -> dict[str, float]:
    if opts.sampler in ("euler", "heun"):
        return {"s_churn": opts.s_churn, "s_tmin": opts.s_tmin, "s_tmax": opts.s_tmax, "s_noise": opts.s_noise}
    return {}


# ----------------------------------------------------------------------------- the command


def sdxl_refine(
    prompt_arg: o.PromptArg = None,
    prompt: o.Prompt = None,
    refiner_ckpt: Annotated[Optional[str], typer.Option(
        "--refiner-ckpt", help=f"the SDXL refiner checkpoint ({FILE_REFINER})", show_default=False)] = None,
    ckpt: Annotated[Optional[str], typer.Option(
        "--ckpt", help=f"the SDXL base checkpoint ({FILE_BASE}) for the base -> refiner hand-over",
        show_default=False)] = None,
    init_img: Annotated[Optional[str], typer.Option(
        "--init-img", "--init_img", help="refine this image instead (SDEdit on the refiner)",
        show_default=False)] = None,
    high_noise_frac: Annotated[Optional[float], typer.Option(
        "--high-noise-frac", show_default="0.8", help="share of the noise range the base runs, in (0, 1): the "
        "base takes the timesteps t >= 1000 * (1 - frac), the refiner continues from that sigma")] = None,
    strength: Annotated[Optional[float], typer.Option(
        "--strength", show_default="0.3", help="with --init-img: SDEdit strength in (0, 1]; the refiner runs the "
        "int(strength * (steps + 1)) lowest noise levels of the grid")] = None,
    negative_prompt: o.NegativePrompt = "",
    from_file: o.FromFile = None,
    outdir: o.Outdir = "outputs/sdxl-refine-samples",
    skip_grid: o.SkipGrid = False,
    skip_save: o.SkipSave = False,
    steps: Annotated[int, typer.Option(*o.STEPS_FLAGS, help="sampling steps of the whole grid (shared by base "
                                       "and refiner)")] = 50,
    sampler: Annotated[str, typer.Option("--sampler", help=o.sampler_help("euler = SGM EulerEDM", switches=False),
                                         show_default=False)] = "euler",
    grid: o.Grid = "sgm",
    scale: o.Scale = 5.0,
    s_churn: SChurn = 0.0,
    s_tmin: STmin = 0.0,
    s_tmax: STmax = 999.0,
    s_noise: SNoise = 1.0,
    height: RefineHeight = None,
    width: RefineWidth = None,
    original_size: o.OriginalSize = None,
    crop_coords: o.CropCoords = None,
    target_size: o.TargetSize = None,
    aesthetic_score: o.AestheticScore = 6.0,
    negative_aesthetic_score: o.NegativeAestheticScore = 2.5,
    n_samples: o.NSamples = 1,
    n_iter: o.NIter = 1,
    n_rows: o.NRows = 0,
    seed: o.Seed = 42,
    fixed_code: o.FixedCode = False,
    config: Annotated[str, typer.Option("--config", help="base model config")] = CONFIG_BASE,
    refiner_config: Annotated[str, typer.Option("--refiner-config", help="refiner model config")] = CONFIG_REFINER,
    precision: o.PrecisionOpt = o.Precision.autocast,
    device: o.Device = "auto",
    safety_checker: o.SafetyCheckerPath = None,
    no_safety_checker: o.NoSafetyChecker = False,
    no_watermark: o.NoWatermark = False,
) -> None:
    """SDXL base -> refiner hand-over (--ckpt), or refine an image with the refiner (--init-img)."""
    report(execute_refine(o.options_from_flags(RefineOptions, "sdxl-refine", locals())))
