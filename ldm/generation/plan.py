"""options -> a run plan: every check that can fail before a model is loaded, and the run as image jobs.

:func:`plan_run` reads the prompt file, the init image(s) and the model configs, fills the unset options from
:mod:`ldm.defaults`, applies each prompt line's and sweep cell's own settings, checks numbers, sizes, files and
the family's grid (step counts, strength, the base -> refiner split) for every settings group, hashes the files,
and lays the run out as an ordered list of batches of :class:`~ldm.generation.request.ImageJob`
(:mod:`ldm.generation.jobs`). Each failure is one :class:`~ldm.errors.SdgenError` line; a prompt line's names
its file and line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional

import torch

from ldm.adapters.adapter_set import Adapters, plan_adapters
from ldm.defaults import COMMAND_DEFAULTS, DEMO_COMMANDS, FAMILY_NAMES, INPUT_SIZED, defaults_for
from ldm.errors import SdgenError
from ldm.generation import images as image_io
from ldm.engines import check_engine
from ldm.generation.inputs import InitImage, InitImages, available_memory, upscale_memory
from ldm.generation.checks import check_adapter_hashes, check_expectations, check_options, resolve_device
from ldm.generation.jobs import SWEEP_FIELDS, Sweep, Unit, lay_out, parse_sweep, sweep_cells
from ldm.generation.options import FLAGS, SDXL_FIELDS, GenerateOptions, parse_pair
from ldm.generation.prompt_file import SLD_FIELDS, PromptEntry, read_prompt_file
from ldm.generation.request import ImageJob, Settings
from ldm.model_files import (
    CONFIG_SDXL_BASE,
    CONFIG_SDXL_REFINER,
    CONFIG_UNCLIP_L,
    DEFAULT_CKPT,
    DEFAULT_DEPTH_CKPT,
    DEFAULT_INPAINT_CKPT,
    DEFAULT_UNCLIP_CKPT,
    DEFAULT_UPSCALE_CKPT,
    ModelFiles,
    bundled_config,
    check_checkpoint_role,
    config_alphas_cumprod,
    demo_model_files,
    family_of,
    file_sha256,
    latent_size_multiple,
    model_kind,
    resolve_checkpoint,
    unet_in_channels,
    unet_params,
    vae_downsampling_factor,
)
from ldm.model_id import check_command, identify_file
from ldm.output import OutputFolder
from ldm.sampling.grids import schedule_grid

#: Commands whose input images condition the model (rather than only start the latent, as img2img's).
CONDITIONING_COMMANDS = ("unclip-variate", "inpaint", "depth2img", "upscale")
#: The model family each input command needs (inpainting also runs on any SD 1.x / 2.x model).
COMMAND_FAMILIES = {"inpaint": ("inpaint", "sd"), "depth2img": ("depth",), "upscale": ("upscale",)}
#: Where the input commands look for their checkpoint when --ckpt is not given.
INPUT_CKPTS = {"inpaint": DEFAULT_INPAINT_CKPT, "depth2img": DEFAULT_DEPTH_CKPT, "upscale": DEFAULT_UPSCALE_CKPT}
UPSCALE = 4  # the x4 upscaler's output / input size

UNCLIP_INPUT_MULTIPLE = 64  # the SAI2 demo resizes the input down to multiples of 64 (LANCZOS) before embedding it


@dataclass(frozen=True)
class ModelSpec:
    """One model of a run, before it is loaded: its role ("model", "base" or "refiner"), files, loaded config,
    kind ("sd", "unclip", "sdxl"), the checkpoint's sha256 and, when the config was picked from the checkpoint,
    why."""

    role: str
    files: ModelFiles
    config: Any
    kind: str
    sha256: str
    config_reason: str = ""  # why the config was chosen, when --config was not given


@dataclass
class RunPlan:
    """A checked run: ``opts`` with every default filled in (what the manifest records), the models to load, the
    settings groups (each batch's settings is one of them), the ordered batches of jobs, the prompt entries, the
    init images, the sweep axes and where to write."""

    opts: GenerateOptions
    models: list[ModelSpec]
    groups: list[Settings]
    batches: list[list[ImageJob]]
    entries: list[PromptEntry]
    init_images: list[InitImage]
    out: OutputFolder
    device: torch.device
    sweeps: list[Sweep] = dataclasses.field(default_factory=list)
    adapters: Adapters = dataclasses.field(default_factory=Adapters)
    prior: Any = None  # the Karlo prior of unCLIP-L text-to-image (ldm.models.prior.files.PriorSpec), else None

    @property
    def settings(self) -> Settings:
        """The first settings group (the only one unless prompt lines or sweeps set their own)."""
        return self.groups[0]

    @property
    def prompts(self) -> list[str]:
        return [entry.prompt for entry in self.entries]

    @property
    def num_images(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def conditioning_images(self) -> bool:
        """Whether the init images condition the model (unCLIP, inpainting, depth, upscaling) rather than only start
        the latent (img2img)."""
        return self.opts.command in CONDITIONING_COMMANDS

    @property
    def uses_demo_model(self) -> bool:
        """Whether the run uses the bundled demo model."""
        from ldm.model_files import demo_model_files

        demo = demo_model_files()
        return demo is not None and any(spec.files.checkpoint.resolve() == demo.checkpoint.resolve()
                                        for spec in self.models)

    def models_sha256(self) -> list[str]:
        """The checkpoints' sha256 (the prior's too) and the adapter files' (with LoRA weights): what decides the
        pixels."""
        prior = [self.prior.sha256] if self.prior is not None else []
        return [spec.sha256 for spec in self.models] + prior + self.adapters.sha256()


# ----------------------------------------------------------------------------- prompts and models


def prompt_entries(opts: GenerateOptions) -> list[PromptEntry]:
    """The run's prompts: recorded entries (replay), the lines of ``--from-file``, or the single prompt."""
    if opts.prompt_entries is not None:
        return [PromptEntry(e["prompt"], e.get("where", ""), dict(e.get("overrides") or {}), dict(e.get("tags") or {}))
                for e in opts.prompt_entries]
    if opts.prompt_list is not None:
        return [PromptEntry(p, f"prompt {n}") for n, p in enumerate(opts.prompt_list, start=1)]
    if opts.from_file is not None:
        entries = read_prompt_file(opts.from_file, tags=opts.tags, i2p_settings=opts.i2p_settings)
        if opts.command == "unclip-variate" and any("init_img" in e.overrides for e in entries):
            where = next(e.where for e in entries if "init_img" in e.overrides)
            raise SdgenError(f"{where}: unclip-variate takes its images from --init-img, not from prompt lines")
        return entries
    prompt = opts.prompt if opts.prompt is not None else COMMAND_DEFAULTS[opts.command]["prompt"]
    return [PromptEntry(prompt, "--prompt")]


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
    files = resolve_checkpoint(opts.ckpt, opts.config, demo=opts.command in DEMO_COMMANDS,
                               default_ckpt=INPUT_CKPTS.get(opts.command, DEFAULT_CKPT))
    reason = ""
    demo = demo_model_files()
    if opts.config is None and demo is not None and files.checkpoint == demo.checkpoint:
        files = demo  # the bundled demo model, named by its path
    elif opts.config is None:
        from ldm.checkpoint_reader import check_checkpoint_file
        from ldm.config_choice import choose_config

        check_checkpoint_file(files.checkpoint)
        choice = choose_config(files.checkpoint)
        if choice.identity is not None:  # picked from the keys: the file must be one this command runs
            check_command(choice.identity, opts.command, files.checkpoint)
        files, reason = ModelFiles(config=choice.path, checkpoint=files.checkpoint), choice.reason
    spec = replace(_model("model", files), config_reason=reason)
    return [replace(spec, role="base")] if spec.kind == "sdxl" else [spec]


def _unclip_model(opts: GenerateOptions) -> ModelSpec:
    """The unCLIP model: its config given, or picked from the checkpoint's keys (unCLIP-L or -H)."""
    from ldm.checkpoint import load_model_config
    from ldm.checkpoint_reader import check_checkpoint_file
    from ldm.models.diffusion.unclip import UNCLIP_FILES_HINT

    files = resolve_checkpoint(opts.ckpt or DEFAULT_UNCLIP_CKPT, opts.config or str(bundled_config(CONFIG_UNCLIP_L)),
                               demo=False)
    if opts.config is not None and model_kind(load_model_config(files.config)) != "unclip":
        raise SdgenError(f"--config {opts.config} is not a Stable unCLIP config; {UNCLIP_FILES_HINT}")
    check_checkpoint_file(files.checkpoint)
    identity = identify_file(files.checkpoint)
    if identity.family != "unclip":
        looks = (f" (it is {identity.describe()}, a model for {identity.config}: sdgen {identity.command})"
                 if identity.config else "")
        raise SdgenError(f"--ckpt {opts.ckpt or DEFAULT_UNCLIP_CKPT} is not a Stable unCLIP checkpoint{looks}; "
                         f"{UNCLIP_FILES_HINT}")
    if opts.config is None:
        files = ModelFiles(config=bundled_config(str(identity.config)), checkpoint=files.checkpoint)
    return _model("model", files)


# ----------------------------------------------------------------------------- defaults, sizes, images


def resolve_defaults(opts: GenerateOptions, spec: ModelSpec) -> GenerateOptions:
    """``opts`` with its unset fields taken from :func:`ldm.defaults.defaults_for` for the model's family and
    config. A run that starts from an init image keeps an unset size (the image's); the hand-over fraction and the
    SDEdit strength apply in their own ``sdxl-refine`` mode only."""
    defaults = defaults_for(opts.command, family_of(spec.kind), spec.config)
    if opts.init_img is not None and opts.command in INPUT_SIZED + ("sdxl-refine",):
        defaults.pop("height", None)
        defaults.pop("width", None)
    if opts.command == "sdxl-refine":
        defaults.pop("strength" if opts.init_img is None else "high_noise_frac")
    names = {f.name for f in fields(opts)}
    return replace(opts, **{k: v for k, v in defaults.items() if k in names and getattr(opts, k) is None})


def uses_prior(opts: GenerateOptions, specs: list[ModelSpec]) -> bool:
    """Whether the run is unCLIP-L text-to-image: ``txt2img`` with an unCLIP checkpoint (the Karlo prior)."""
    return opts.command == "txt2img" and specs[0].kind == "unclip"


PRIOR_FLAGS = {"prior": "--prior", "prior_config": "--prior-config", "prior_clip": "--prior-clip",
               "prior_steps": "--prior-steps", "prior_scale": "--prior-scale"}


def check_family(opts: GenerateOptions, specs: list[ModelSpec]) -> None:
    """The SDXL options only for SDXL models, the prior's only for unCLIP text-to-image, the input commands' models
    (raises SdgenError)."""
    needs = COMMAND_FAMILIES.get(opts.command)
    if needs is not None and specs[0].kind not in needs:
        raise SdgenError(f"sdgen {opts.command} needs a {' or '.join(FAMILY_NAMES[f] for f in needs)} model; the config "
                         f"{specs[0].files.config.name} builds a {FAMILY_NAMES.get(specs[0].kind, 'another')} model")
    given = [flag for name, flag in PRIOR_FLAGS.items() if getattr(opts, name, None) is not None]
    if given and not uses_prior(opts, specs):
        raise SdgenError(f"{', '.join(given)} apply to txt2img with an unCLIP-L checkpoint (the Karlo prior) only")
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
    # the latent channels: the UNet's output (its input may add concatenated channels: inpainting, depth, upscaling)
    params = unet_params(config) or {}
    in_channels = int(params["out_channels"]) if "out_channels" in params else unet_in_channels(config)
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


def sampling_settings(opts: GenerateOptions, specs: list[ModelSpec], height: int, width: int, factor: int) -> Settings:
    """The :class:`Settings` of a planned run (every default filled in)."""
    sdxl = specs[0].kind == "sdxl"
    start = opts.command in ("img2img", "depth2img") or (opts.command == "sdxl-refine" and opts.init_img is not None)
    return Settings(
        sampler=opts.sampler, steps=opts.steps, grid=schedule_grid(opts.schedule, opts.sampler, opts.grid if sdxl else None),
        schedule=opts.schedule,
        scale=opts.scale, height=height, width=width, factor=factor, latent_channels=opts.latent_channels,
        precision=opts.precision, eta=opts.eta, strength=opts.strength if start else None,
        high_noise_frac=opts.high_noise_frac if len(specs) == 2 else None,
        s_churn=opts.s_churn or 0.0, s_tmin=opts.s_tmin or 0.0,
        s_tmax=opts.s_tmax if opts.s_tmax is not None else float("inf"), s_noise=opts.s_noise or 1.0,
        noise_level=opts.noise_level or 0, original_size=parse_pair(FLAGS["original_size"], opts.original_size),
        crop_coords=parse_pair(FLAGS["crop_coords"], opts.crop_coords),
        target_size=parse_pair(FLAGS["target_size"], opts.target_size),
        sld=opts.sld, prompt_syntax=opts.prompt_syntax, clip_skip=opts.clip_skip, tile=bool(opts.tile),
        engine=opts.engine,
        **({"prior_steps": opts.prior_steps, "prior_scale": opts.prior_scale} if uses_prior(opts, specs) else {}),
        **{k: getattr(opts, k) for k in ("aesthetic_score", "negative_aesthetic_score") if getattr(opts, k) is not None},
    )


# ----------------------------------------------------------------------------- prompt lines and sweep cells


def effective_options(opts: GenerateOptions, values: Mapping[str, Any]) -> GenerateOptions:
    """``opts`` with a prompt line's or sweep cell's own settings (SLD fields merged into the SLD settings)."""
    from ldm.sld_config import load_preset, options_record, params_from_record

    plain = {k: v for k, v in values.items() if k not in SLD_FIELDS and k not in ("prompt", "n_samples")}
    changed = replace(opts, **plain)
    sld = {k: v for k, v in values.items() if k in SLD_FIELDS}
    if not sld:
        return changed
    source, params = params_from_record(opts.sld) if opts.sld else ("medium", load_preset("medium"))
    if "sld" in sld:
        source, params = str(sld["sld"]).strip().lower(), load_preset(str(sld.pop("sld")))
    renames = {"sld_guidance_scale": "guidance_scale", "sld_warmup_steps": "warmup_steps",
               "sld_threshold": "threshold", "sld_momentum_scale": "momentum_scale",
               "sld_momentum_beta": "momentum_beta", "safety_concept": "safety_concept"}
    params = params.replace(**{renames[k]: v for k, v in sld.items()})
    return replace(changed, sld=options_record(params, source))


def plan_units(opts: GenerateOptions, entries: list[PromptEntry], cell: Mapping[str, Any], specs: list[ModelSpec],
               images: InitImages, multiple: int, factor: int) -> list[Unit]:
    """The units of one iteration of a sweep cell (unCLIP: every prompt entry for each of its images)."""
    cell_items = tuple(cell.items())
    label = ", ".join(f"{k}={v}" for k, v in cell_items)
    if opts.command == "unclip-variate":
        conditioning = [images.add(p, None, UNCLIP_INPUT_MULTIPLE) for p in image_io.image_paths(opts.init_img)]
    else:
        conditioning = [None]
    units = []
    for init in conditioning:
        for entry in entries:
            where = entry.where if ":" in entry.where else (f"--sweep {label}" if label else "")
            try:
                eff = effective_options(opts, {**entry.overrides, **cell})
                check_options(eff)
                for spec in specs:
                    check_geometry(spec.config, eff)
                height, width = eff.height, eff.width
                latent_init = init
                if eff.init_img is not None and opts.command != "unclip-variate":
                    scale = UPSCALE if opts.command == "upscale" else 1  # the upscaler's input: a quarter
                    size = None if height is None and width is None else (
                        height // scale if height else None, width // scale if width else None)
                    latent_init = images.add(eff.init_img, size, multiple // scale, mask=eff.mask,
                                             depth_map=eff.depth_map)
                    tensor = images.images[latent_init].tensor
                    height, width = int(tensor.shape[1]) * scale, int(tensor.shape[2]) * scale
                if height is None or width is None:
                    raise SdgenError("--H and --W are needed without an init image")
                for flag, value in (("--H", height), ("--W", width)):
                    if value % multiple:
                        raise SdgenError(f"{flag} {value} must be a multiple of {multiple} for "
                                         f"{'these models' if len(specs) > 1 else 'this model'} (VAE factor "
                                         f"{factor} x UNet downsampling {multiple // factor})")
                settings = sampling_settings(eff, specs, height, width, factor)
            except SdgenError as exc:
                raise SdgenError(f"{where}: {exc}" if where else str(exc)) from None
            own = entry.overrides.get("n_samples")
            count = own or (1 if opts.per_image_prompts else eff.n_samples)
            units.append(Unit(entry, settings, count, own or eff.n_samples, eff.negative_prompt, latent_init,
                              entry.overrides.get("seed"), cell_items))
    return units


# ----------------------------------------------------------------------------- the plan


def plan_run(opts: GenerateOptions, *, expect: Optional[Mapping[str, Any]] = None) -> RunPlan:
    """Every check that needs no model, in the order a user would fix them (raises SdgenError)."""
    from ldm.generation.stages import plan_grids

    check_options(opts)
    entries = prompt_entries(opts)
    sweeps = [parse_sweep(text) for text in opts.sweep]
    cells = sweep_cells(sweeps)
    images = InitImages()  # a bad image is reported before the models' files
    if opts.command == "unclip-variate":
        for path in image_io.image_paths(opts.init_img):
            images.read(path)
    for path, where in [(opts.init_img, "")] + [(e.overrides.get("init_img"), e.where) for e in entries]:
        if path is not None and opts.command != "unclip-variate":
            images.read(path, where)
    specs = plan_models(opts)
    check_family(opts, specs)
    prior = None
    if uses_prior(opts, specs):
        from ldm.model_files import checkpoint_shapes
        from ldm.models.prior.files import plan_prior

        prior = plan_prior(opts, specs[0].config, checkpoint_shapes(specs[0].files.checkpoint))
    opts = resolve_defaults(opts, specs[0])
    factors = [check_geometry(spec.config, opts) for spec in specs]
    multiple = max(latent_size_multiple(spec.config) for spec in specs)
    cell_units = [plan_units(opts, entries, cell, specs, images, multiple, factors[-1]) for cell in cells]
    seeds = [cell.get("seed", opts.seed) for cell in cells]
    batches = lay_out(list(zip(seeds, cell_units)), opts.n_iter, fixed_code=opts.fixed_code)
    groups: list[Settings] = []
    alphas = config_alphas_cumprod(specs[0].config)
    for units in cell_units:
        for unit in units:
            if unit.settings not in groups:
                try:
                    plan_grids(unit.settings, alphas, [spec.role for spec in specs])
                except SdgenError as exc:
                    where = unit.entry.where if ":" in unit.entry.where else ""
                    raise SdgenError(f"{where}: {exc}" if where else str(exc)) from None
                groups.append(unit.settings)
    if opts.command == "upscale" and not opts.tile:
        check_upscale_memory(groups, opts, specs[0].files.checkpoint.stat().st_size)
    adapters = plan_adapters(opts, run_prompts(opts, entries), [spec.config for spec in specs])
    if opts.safety_checker is not None and not opts.no_safety_checker:
        from ldm.checkpoint_reader import check_checkpoint_file

        check_checkpoint_file(opts.safety_checker, "safety-checker file")
    out = OutputFolder(opts.outdir)
    device = resolve_device(opts.device)
    check_engine(opts.engine, opts.precision, device.type, compile=opts.compile, offload=opts.offload)
    inits = images.images
    found = {"checkpoint_sha256": specs[0].sha256,
             "refiner_checkpoint_sha256": specs[-1].sha256 if specs[-1].role == "refiner" else None,
             "init_image_sha256": ([i.key_sha256 for i in inits] if opts.command in CONDITIONING_COMMANDS
                                   else (inits[0].sha256 if inits else None)),
             "prior_sha256": prior.sha256 if prior is not None else None}
    check_expectations({k: v for k, v in (expect or {}).items() if k != "adapters"}, found)
    check_adapter_hashes((expect or {}).get("adapters"), adapters.record())
    return RunPlan(opts, specs, groups, batches, entries, inits, out, device, sweeps, adapters, prior)


def check_upscale_memory(groups: list[Settings], opts: GenerateOptions, weights: int = 0) -> None:
    """Refuse, before loading, an untiled upscale whose estimated working memory plus its ``weights`` (bytes, the
    checkpoint's size) exceeds what this machine has."""
    free = available_memory()
    for settings in groups:
        h, w = settings.height // UPSCALE, settings.width // UPSCALE
        need = upscale_memory(h, w, opts.n_samples or 1) + weights
        if free is not None and need > free:
            raise SdgenError(f"upscaling a {w}x{h} image to {settings.width}x{settings.height} needs about "
                             f"{need / 2**30:.1f} GiB of memory (weights and working memory) and "
                             f"{free / 2**30:.1f} GiB are available: add --tile (bounded memory), or use a smaller "
                             "input or --n_samples")


def run_prompts(opts: GenerateOptions, entries: list[PromptEntry]) -> list[tuple[tuple[str, ...], str]]:
    """Each prompt line's texts (its prompt and negative prompt) with where it was written (for LoRA tags)."""
    out = []
    for entry in entries:
        negative = str(entry.overrides.get("negative_prompt", opts.negative_prompt))
        out.append(((entry.prompt, negative), entry.where))
    return out