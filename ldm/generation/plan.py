"""options -> a run plan: every check that can fail before a model is loaded, and the run as image jobs.

:func:`plan_run` reads the prompt file, the init image(s) and the model configs, fills the unset options from
:mod:`ldm.defaults`, checks numbers, sizes, files and the family's grid (step counts, strength, the base ->
refiner split), hashes the files, and lays the run out as an ordered list of batches of
:class:`~ldm.generation.request.ImageJob`. Each failure is one :class:`~ldm.errors.SdgenError` line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.defaults import COMMAND_DEFAULTS, defaults_for
from ldm.errors import SdgenError
from ldm.generation import images as image_io
from ldm.generation.options import FLAGS, SDXL_FIELDS, GenerateOptions, parse_pair
from ldm.generation.request import ImageJob, Settings, make_jobs, prompt_batches
from ldm.model_files import (
    CONFIG_SDXL_BASE,
    CONFIG_SDXL_REFINER,
    CONFIG_UNCLIP_L,
    DEFAULT_UNCLIP_CKPT,
    FILE_SDXL_BASE,
    FILE_SDXL_REFINER,
    ModelFiles,
    bundled_config,
    check_checkpoint_role,
    config_alphas_cumprod,
    family_of,
    file_sha256,
    latent_size_multiple,
    model_kind,
    resolve_checkpoint,
    unet_in_channels,
    vae_downsampling_factor,
)
from ldm.output import OutputFolder
from ldm.sampling.grids import DEFAULT_GRID, SDXL_GRIDS, check_high_noise_frac
from ldm.sampling.samplers import SAMPLERS

UNCLIP_INPUT_MULTIPLE = 64  # the SAI2 demo resizes the input down to multiples of 64 (LANCZOS) before embedding it
PRECISIONS = ("autocast", "full", "bf16", "fp16")

#: What a replay's expected hashes compare, and what to say when they differ.
EXPECTATIONS = {
    "checkpoint_sha256": "the checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "refiner_checkpoint_sha256": "the refiner checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "init_image_sha256": "the init image differs from the one the manifest recorded (sha256 mismatch)",
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a run, before it is loaded: its role ("model", "base" or "refiner"), files, loaded config,
    kind ("sd", "unclip", "sdxl") and the checkpoint's sha256."""

    role: str
    files: ModelFiles
    config: Any
    kind: str
    sha256: str


@dataclass(frozen=True)
class InitImage:
    """An input image: its file, sha256 and pixels (3, H, W) in [-1, 1] at the size the run uses."""

    path: Path
    sha256: str
    tensor: torch.Tensor


@dataclass
class RunPlan:
    """A checked run: ``opts`` with every default filled in (what the manifest records), the models to load,
    the sampling settings, the ordered batches of jobs, the prompts, the init images and where to write."""

    opts: GenerateOptions
    models: list[ModelSpec]
    settings: Settings
    batches: list[list[ImageJob]]
    prompts: list[str]
    init_images: list[InitImage]
    out: OutputFolder
    device: torch.device

    @property
    def num_images(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def conditioning_images(self) -> bool:
        """Whether the init images condition the model (unCLIP) rather than start the latent (img2img)."""
        return self.settings.strength is None and bool(self.init_images)


# ----------------------------------------------------------------------------- checks that need no file


def check_options(opts: GenerateOptions) -> None:
    """Validate the given numbers and names (unset ones are skipped); raises SdgenError."""
    for name in ("steps", "n_samples", "n_iter", "latent_channels", "factor"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise SdgenError(f"{FLAGS[name]} must be at least 1, got {value}")
    if opts.n_rows < 0:
        raise SdgenError(f"--n_rows must be 0 (= n_samples) or more, got {opts.n_rows}")
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is None:
            continue
        if opts.command == "sdxl-refine" and value <= 0:  # the SGM demo has no multiple-of-8 rule of its own
            raise SdgenError(f"{FLAGS[name]} must be a positive number of pixels, got {value}")
        if opts.command != "sdxl-refine" and (value <= 0 or value % 8):  # CompVis: f=8 latents
            raise SdgenError(f"{FLAGS[name]} must be a positive multiple of 8, got {value}")
        if opts.factor and value % opts.factor:
            raise SdgenError(f"{FLAGS[name]} {value} is not a multiple of --f {opts.factor}")
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.eta < 0:
        raise SdgenError(f"--ddim_eta must be >= 0, got {opts.eta}")
    if opts.sampler == "plms" and opts.eta != 0:
        raise SdgenError("PLMS is deterministic: --ddim_eta must be 0 with --plms")
    if opts.precision not in PRECISIONS:
        raise SdgenError(f"unknown --precision {opts.precision!r} ({', '.join(PRECISIONS)})")
    if opts.grid is not None and opts.grid not in SDXL_GRIDS:
        raise SdgenError(f"unknown --grid {opts.grid!r} ({', '.join(SDXL_GRIDS)})")
    for name in ("original_size", "crop_coords", "target_size"):
        parse_pair(FLAGS[name], getattr(opts, name))
    if opts.strength is not None and not 0.0 < opts.strength <= 1.0:
        raise SdgenError(f"--strength must be in (0, 1], got {opts.strength}")
    if (opts.s_churn or 0) < 0 or (opts.s_noise or 0) < 0:
        raise SdgenError("--s-churn and --s-noise must be >= 0")
    if opts.command == "img2img" and not opts.init_img:
        raise SdgenError("img2img needs an input image: pass --init-img PATH")
    if opts.command == "unclip-variate":
        if not opts.init_img:
            raise SdgenError("unclip-variate needs an input image: pass --init-img PATH (an image or a folder of "
                             "images)")
        if opts.noise_level is not None and not 0 <= opts.noise_level <= 999:
            raise SdgenError(f"--noise-level must be in 0..999 (the augmentor's 1000 noise levels), "
                             f"got {opts.noise_level}")
        for flag, value in (("--clip-stats", opts.clip_stats), ("--embedder-ckpt", opts.embedder_ckpt)):
            if value is not None and not Path(value).expanduser().is_file():
                raise SdgenError(f"{flag} file not found: {value}")
    if opts.command == "sdxl-refine":
        _check_refine(opts)


def _check_refine(opts: GenerateOptions) -> None:
    if not opts.refiner_ckpt:
        raise SdgenError(f"sdxl-refine needs the refiner checkpoint: pass --refiner-ckpt {FILE_SDXL_REFINER}")
    if opts.init_img and opts.ckpt:
        raise SdgenError("give either --ckpt (base -> refiner hand-over) or --init-img (refine an image), not both")
    if not opts.init_img and not opts.ckpt:
        raise SdgenError(f"pass --ckpt {FILE_SDXL_BASE} (base -> refiner hand-over) or --init-img IMAGE (refine it)")
    if opts.init_img is None and opts.strength is not None:
        raise SdgenError("--strength applies to --init-img; the base -> refiner hand-over uses --high-noise-frac")
    if opts.init_img is not None and opts.high_noise_frac is not None:
        raise SdgenError("--high-noise-frac applies to the base -> refiner hand-over (--ckpt), not to --init-img")
    if opts.high_noise_frac is not None:
        check_high_noise_frac(opts.high_noise_frac)


def read_prompts(opts: GenerateOptions) -> list[str]:
    """The run's prompts: ``prompt_list`` (replay), the lines of ``--from-file``, or the single prompt."""
    from ldm.files import read_text_file

    if opts.prompt_list is not None:
        return list(opts.prompt_list)
    if opts.from_file is None:
        return [opts.prompt if opts.prompt is not None else COMMAND_DEFAULTS[opts.command]["prompt"]]
    text = read_text_file(Path(opts.from_file), "prompt file")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SdgenError(f"the prompt file {opts.from_file} holds no prompt (one prompt per line)")
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
        raise SdgenError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SdgenError(f"--device {name}: MPS is not available on this machine")
    return device


def check_expectations(expect: Optional[Mapping[str, Any]], found: Mapping[str, Any]) -> None:
    """Refuse files that differ from the ones a manifest recorded: every truthy ``expect`` entry (a key of
    :data:`EXPECTATIONS`) must equal ``found``'s (raises SdgenError)."""
    for key, value in (expect or {}).items():
        if value and value != found.get(key):
            raise SdgenError(EXPECTATIONS.get(key, f"{key} differs from the recorded one"))


# ----------------------------------------------------------------------------- models


def _model(role: str, files: ModelFiles) -> ModelSpec:
    from ldm.checkpoint import load_model_config
    from ldm.checkpoint_reader import check_checkpoint_file

    check_checkpoint_file(files.checkpoint)
    config = load_model_config(files.config)
    return ModelSpec(role, files, config, model_kind(config), file_sha256(files.checkpoint))


def plan_models(opts: GenerateOptions) -> list[ModelSpec]:
    """The models of a run, in stage order, with their configs read and their checkpoints checked."""
    if opts.command == "sdxl-refine":
        specs = []
        if opts.init_img is None:
            base = resolve_checkpoint(opts.ckpt, opts.config or CONFIG_SDXL_BASE, demo=False)
            check_checkpoint_role(base.checkpoint, "base", "--ckpt")
            specs.append(_model("base", base))
        refiner = resolve_checkpoint(opts.refiner_ckpt, opts.refiner_config or CONFIG_SDXL_REFINER, demo=False)
        check_checkpoint_role(refiner.checkpoint, "refiner", "--refiner-ckpt")
        specs.append(_model("refiner", refiner))
        for spec in specs:
            if spec.kind != "sdxl":
                flag = "--ckpt" if spec.role == "base" else "--refiner-ckpt"
                raise SdgenError(f"{flag}: the config {spec.files.config} does not build an SDXL DiffusionEngine")
        return specs
    if opts.command == "unclip-variate":
        return [_unclip_model(opts)]
    spec = _model("model", resolve_checkpoint(opts.ckpt, opts.config))
    return [replace(spec, role="base")] if spec.kind == "sdxl" else [spec]


def _unclip_model(opts: GenerateOptions) -> ModelSpec:
    """The unCLIP model: its config given, or picked from the checkpoint's keys (unCLIP-L or -H)."""
    from ldm.checkpoint import load_model_config
    from ldm.checkpoint_reader import check_checkpoint_file
    from ldm.model_files import checkpoint_shapes, guess_config
    from ldm.models.diffusion.unclip import UNCLIP_FILES_HINT, is_unclip_state_dict, unclip_config_for

    files = resolve_checkpoint(opts.ckpt or DEFAULT_UNCLIP_CKPT, opts.config or str(bundled_config(CONFIG_UNCLIP_L)),
                               demo=False)
    if opts.config is not None and model_kind(load_model_config(files.config)) != "unclip":
        raise SdgenError(f"--config {opts.config} is not a Stable unCLIP config; {UNCLIP_FILES_HINT}")
    check_checkpoint_file(files.checkpoint)
    shapes = checkpoint_shapes(files.checkpoint)
    if not is_unclip_state_dict(shapes):
        guess = guess_config(shapes)
        looks = f" (it looks like a model for {guess})" if guess else ""
        raise SdgenError(f"--ckpt {opts.ckpt or DEFAULT_UNCLIP_CKPT} is not a Stable unCLIP checkpoint{looks}; "
                         f"{UNCLIP_FILES_HINT}")
    if opts.config is None:
        bundled = unclip_config_for(shapes)
        if bundled is None:
            raise SdgenError(f"cannot tell which unCLIP config {files.checkpoint} needs: pass --config")
        files = ModelFiles(config=bundled_config(bundled), checkpoint=files.checkpoint)
    return _model("model", files)


# ----------------------------------------------------------------------------- defaults and sizes


def resolve_defaults(opts: GenerateOptions, spec: ModelSpec) -> GenerateOptions:
    """``opts`` with its unset fields taken from :func:`ldm.defaults.defaults_for` for the model's family and
    config. A run that starts from an init image keeps an unset size (the image's); the hand-over fraction and the
    SDEdit strength apply in their own ``sdxl-refine`` mode only."""
    defaults = defaults_for(opts.command, family_of(spec.kind), spec.config)
    if opts.init_img is not None and opts.command in ("img2img", "sdxl-refine"):
        defaults.pop("height", None)
        defaults.pop("width", None)
    if opts.command == "sdxl-refine":
        defaults.pop("strength" if opts.init_img is None else "high_noise_frac")
    names = {f.name for f in fields(opts)}
    return replace(opts, **{k: v for k, v in defaults.items() if k in names and getattr(opts, k) is None})


def check_family(opts: GenerateOptions, specs: list[ModelSpec]) -> None:
    """The SDXL options only for SDXL models (raises SdgenError)."""
    if any(spec.kind == "sdxl" for spec in specs):
        return
    given = [FLAGS[name] for name in SDXL_FIELDS if getattr(opts, name) is not None]
    if given:
        raise SdgenError(f"{', '.join(given)} apply to SDXL models only; this config is not an SDXL one")


def check_geometry(config: Any, opts: GenerateOptions) -> int:
    """``--f`` / ``--C`` / ``--H`` / ``--W`` against the config (raises SdgenError); returns the VAE factor."""
    vae_factor = vae_downsampling_factor(config)
    if opts.factor is not None and opts.factor != vae_factor:
        raise SdgenError(f"--f {opts.factor} does not match the config's VAE downsampling factor {vae_factor}")
    in_channels = unet_in_channels(config)
    if in_channels is not None and opts.latent_channels != in_channels:
        raise SdgenError(f"--C {opts.latent_channels} does not match the config's {in_channels} latent channels")
    multiple = latent_size_multiple(config)
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and value % multiple:
            raise SdgenError(
                f"{FLAGS[name]} {value} must be a multiple of {multiple} for this model "
                f"(VAE factor {vae_factor} x UNet downsampling {multiple // vae_factor})"
            )
    return vae_factor


def read_init_images(opts: GenerateOptions) -> list[tuple[Path, Any]]:
    """The run's input images as (path, PIL image): the img2img / SDEdit image, or unCLIP's image or folder."""
    if opts.init_img is None:
        return []
    paths = image_io.image_paths(opts.init_img) if opts.command == "unclip-variate" else [Path(opts.init_img)]
    return [(p, image_io.read_image(p)) for p in paths]


def plan_init_images(opts: GenerateOptions, images: list[tuple[Path, Any]], multiple: int) -> list[InitImage]:
    """The input images at the size the run uses: the img2img / SDEdit image at the requested size (or its own,
    rounded down to ``multiple``); unCLIP's images at their own size rounded down to multiples of 64."""
    if opts.command == "unclip-variate":
        return [InitImage(p, file_sha256(p), image_io.image_to_tensor(pil, None, UNCLIP_INPUT_MULTIPLE))
                for p, pil in images]
    return [InitImage(p, file_sha256(p), image_io.fit_init_image(pil, opts.height, opts.width, multiple))
            for p, pil in images]


def sampling_settings(opts: GenerateOptions, specs: list[ModelSpec], height: int, width: int, factor: int) -> Settings:
    """The :class:`Settings` of a planned run (every default filled in)."""
    sdxl = specs[0].kind == "sdxl"
    start = opts.command == "img2img" or (opts.command == "sdxl-refine" and opts.init_img is not None)
    return Settings(
        sampler=opts.sampler, steps=opts.steps, grid=opts.grid if sdxl else DEFAULT_GRID[opts.sampler],
        scale=opts.scale, height=height, width=width, factor=factor, latent_channels=opts.latent_channels,
        precision=opts.precision, eta=opts.eta, strength=opts.strength if start else None,
        high_noise_frac=opts.high_noise_frac if len(specs) == 2 else None,
        s_churn=opts.s_churn or 0.0, s_tmin=opts.s_tmin or 0.0,
        s_tmax=opts.s_tmax if opts.s_tmax is not None else float("inf"), s_noise=opts.s_noise or 1.0,
        noise_level=opts.noise_level or 0, original_size=parse_pair(FLAGS["original_size"], opts.original_size),
        crop_coords=parse_pair(FLAGS["crop_coords"], opts.crop_coords),
        target_size=parse_pair(FLAGS["target_size"], opts.target_size),
        sld=opts.sld,
        **{k: getattr(opts, k) for k in ("aesthetic_score", "negative_aesthetic_score") if getattr(opts, k) is not None},
    )


def plan_batches(opts: GenerateOptions, prompts: list[str], init_images: list[InitImage]) -> list[list[ImageJob]]:
    """The ordered batches of the run: the prompt batches (one per init image for unCLIP), ``n_iter`` times."""
    per_prompt = prompt_batches(prompts, opts.n_samples, per_image=opts.per_image_prompts)
    if opts.command == "unclip-variate":
        batches = [b for _ in init_images for b in per_prompt]
        inits = [i for i in range(len(init_images)) for _ in per_prompt]
    else:
        batches, inits = per_prompt, [0 if init_images else None] * len(per_prompt)
    return make_jobs(batches, opts.n_iter, opts.seed, negative_prompt=opts.negative_prompt,
                     fixed_code=opts.fixed_code, init_images=inits)


# ----------------------------------------------------------------------------- the plan


def plan_run(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (raises SdgenError)."""
    from ldm.generation.stages import plan_grids

    check_options(opts)
    prompts = read_prompts(opts)
    pil_images = read_init_images(opts)
    specs = plan_models(opts)
    check_family(opts, specs)
    opts = resolve_defaults(opts, specs[0])
    factors = [check_geometry(spec.config, opts) for spec in specs]
    multiple = max(latent_size_multiple(spec.config) for spec in specs)
    init_images = plan_init_images(opts, pil_images, multiple)
    height, width = opts.height, opts.width
    if init_images and opts.command != "unclip-variate":
        height, width = int(init_images[0].tensor.shape[1]), int(init_images[0].tensor.shape[2])
    if height is None or width is None:
        raise SdgenError("--H and --W are needed without an init image")
    for flag, value in (("--H", height), ("--W", width)):
        if value % multiple:
            raise SdgenError(f"{flag} {value} must be a multiple of {multiple} for "
                             f"{'these models' if len(specs) > 1 else 'this model'} "
                             f"(VAE factor {factors[-1]} x UNet downsampling {multiple // factors[-1]})")
    settings = sampling_settings(opts, specs, height, width, factors[-1])
    plan_grids(settings, config_alphas_cumprod(specs[0].config), [spec.role for spec in specs])
    if opts.safety_checker is not None and not opts.no_safety_checker:
        from ldm.checkpoint_reader import check_checkpoint_file

        check_checkpoint_file(opts.safety_checker, "safety-checker file")
    batches = plan_batches(opts, prompts, init_images)
    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    found = {"checkpoint_sha256": specs[0].sha256,
             "refiner_checkpoint_sha256": specs[-1].sha256 if specs[-1].role == "refiner" else None,
             "init_image_sha256": ([i.sha256 for i in init_images] if opts.command == "unclip-variate"
                                   else (init_images[0].sha256 if init_images else None))}
    check_expectations(expect, found)
    return RunPlan(opts, specs, settings, batches, prompts, init_images, out, device)
