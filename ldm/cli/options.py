"""Shared command-line flags and the options dataclasses the generation commands fill.

Every flag of the CompVis ``scripts/txt2img.py`` / ``scripts/img2img.py`` keeps its original spelling
(``--ddim_steps``, ``--n_samples``, ``--H`` ...) next to a dashed one (``--ddim-steps``, ``--steps``); the
defaults of each command live in its own module (txt2img.py, img2img.py) as the originals had them. The
sampling flags txt2img / img2img leave unset (steps, scale, sampler, size) take the model family's defaults
(:data:`COMPVIS_DEFAULTS`, or the SGM demo's for an SDXL config), filled in once the config is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Annotated, Any, Mapping, Optional, TypeVar

import typer

from ldm.errors import SdgenError

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"  # CV scripts/txt2img.py
SAMPLER_NAMES = ("ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral", "heun")

#: Sampling defaults of the original scripts (CV scripts/txt2img.py, scripts/img2img.py) for every model that is
#: not SDXL (img2img takes its size from the init image); SDXL configs bring the SGM demo's
#: (:func:`ldm.sdxl_pipeline.sdxl_sampling_defaults`: Euler, 50 steps, scale 5.0, 1024 x 1024).
COMPVIS_DEFAULTS: dict[str, dict[str, Any]] = {
    "txt2img": {"sampler": "ddim", "steps": 50, "scale": 7.5, "height": 512, "width": 512, "n_iter": 2},
    "img2img": {"sampler": "ddim", "steps": 50, "scale": 5.0, "n_iter": 1},
}

#: The SDXL micro-conditioning / grid fields of :class:`GenerateOptions` and their flags.
SDXL_FIELDS = {
    "grid": "--grid",
    "original_size": "--original-size",
    "crop_coords": "--crop-coords",
    "target_size": "--target-size",
    "aesthetic_score": "--aesthetic-score",
    "negative_aesthetic_score": "--negative-aesthetic-score",
}


class Precision(str, Enum):
    """``autocast``: fp16 autocast on CUDA, fp32 elsewhere (the originals' default); ``full``: fp32;
    ``bf16``: bfloat16 autocast on any device (the CPU included); ``fp16``: float16 autocast (CUDA)."""

    autocast = "autocast"
    full = "full"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass(kw_only=True)
class RunOptions:
    """The options every generation command shares (the flags, resolved), stored in the run manifest; each
    command's dataclass adds its own fields and defaults (:class:`GenerateOptions`, ``UnclipOptions``,
    ``RefineOptions``).

    ``prompt_list`` (set by ``sdgen replay``) replaces reading ``from_file`` again. ``height``/``width`` None mean
    the default size or the init image's; ``ckpt`` None the original scripts' default path. ``safety_checker`` is
    a checker weights file (None: the model config's ``safety_checker`` entry, if any). The SDXL
    micro-conditioning fields (:data:`SDXL_FIELDS`, None: the SGM demo's values) apply to SDXL models only.
    """

    command: str
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    from_file: Optional[str] = None
    prompt_list: Optional[list[str]] = field(default=None)
    skip_grid: bool = False
    skip_save: bool = False
    n_rows: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    seed: int = 42
    fixed_code: bool = False
    ckpt: Optional[str] = None
    init_img: Optional[str] = None
    precision: str = Precision.autocast.value
    device: str = "auto"
    safety_checker: Optional[str] = None
    no_safety_checker: bool = False
    watermark: bool = True
    original_size: Optional[str] = None
    crop_coords: Optional[str] = None
    target_size: Optional[str] = None

    @property
    def per_image_prompts(self) -> bool:
        """Whether each prompt is one image per iteration (a prompt file or a replayed list) rather than one
        prompt for the whole batch."""
        return self.from_file is not None or self.prompt_list is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class GenerateOptions(RunOptions):
    """Everything a txt2img / img2img / safe-txt2img run is made from, stored in the run manifest.

    ``steps``/``sampler``/``scale``/``height``/``width``/``n_iter`` None mean the model family's default (filled in by
    :func:`ldm.cli.run.plan_run`; a recorded run holds the values used); ``height``/``width`` stay None for
    img2img (the init image's size). ``factor`` None means the config's VAE downsampling factor; ``config``
    None the original scripts' default path. ``sld`` holds the Safe Latent Diffusion settings
    (:func:`ldm.sld_config.options_record`), None for plain classifier-free guidance. ``grid`` and the
    aesthetic scores (None: the SGM demo's) apply to SDXL configs only.
    """

    outdir: str = "outputs/txt2img-samples"
    steps: Optional[int] = None
    sampler: Optional[str] = None
    eta: float = 0.0
    n_samples: int = 3
    n_iter: Optional[int] = None
    scale: Optional[float] = None
    latent_channels: int = 4
    factor: Optional[int] = None
    config: Optional[str] = None
    strength: float = 0.75
    sld: Optional[dict[str, Any]] = None
    grid: Optional[str] = None
    aesthetic_score: Optional[float] = None
    negative_aesthetic_score: Optional[float] = None


def pick_sampler(sampler: Optional[str], plms: bool, dpm_solver: bool) -> Optional[str]:
    """The sampler name from ``--sampler`` and the originals' ``--plms`` / ``--dpm_solver`` switches (None when
    none is given: the model's default)."""
    chosen = [name for name, on in (("plms", plms), ("dpmpp_2m", dpm_solver)) if on]
    if len(chosen) > 1:
        raise SdgenError("--plms and --dpm_solver exclude each other; pick one (or use --sampler)")
    if sampler is not None and chosen and chosen[0] != sampler:
        raise SdgenError(f"--sampler {sampler} contradicts --{'plms' if plms else 'dpm_solver'}")
    return sampler or (chosen[0] if chosen else None)


def sampler_help(default: str, switches: bool = True) -> str:
    """``--sampler`` help: the names, the command's ``default`` and, where the command has them, the originals'
    ``--plms`` / ``--dpm_solver`` switches."""
    return (f"sampler: {', '.join(SAMPLER_NAMES)} (default {default}"
            + ("; --plms / --dpm_solver pick those)" if switches else ")"))


#: Image sides must be multiples of VAE factor x UNet downsampling (:func:`ldm.cli.run.check_geometry`,
#: :func:`ldm.pipelines.latent_size_multiple`): 8 x 8 for the SD 1.x / 2.x configs, 8 x 4 for the SDXL base.
SD_SIZE_RULE = "a multiple of 64 for SD 1.x / 2.x: VAE factor 8 x UNet downsampling 8"
SDXL_BASE_SIZE_RULE = "32 for the SDXL base"
ANY_SIZE_RULE = f"{SD_SIZE_RULE}; {SDXL_BASE_SIZE_RULE}"  # txt2img / img2img: SD 1.x / 2.x or SDXL configs
SDXL_REFINER_SIZE_RULE = "a multiple of 64 with the SDXL refiner: VAE factor 8 x UNet downsampling 8"

#: The spellings of the step-count flag in every command (CompVis ``--ddim_steps``).
STEPS_FLAGS = ("--ddim_steps", "--ddim-steps", "--steps")


def size_option(side: str, text: str, rule: str = SD_SIZE_RULE, show_default: Any = True) -> Any:
    """The ``--H``/``--height`` (``side="height"``) or ``--W``/``--width`` option; its help is ``text`` (with
    ``{side}`` filled in) followed by the size ``rule`` in brackets."""
    flags = ("--H", "--height") if side == "height" else ("--W", "--width")
    return typer.Option(*flags, show_default=show_default, help=f"{text.format(side=side)} ({rule})")


def prompt_from(argument: Optional[str], option: Optional[str], default: str = DEFAULT_PROMPT) -> str:
    """The prompt from the positional argument or ``--prompt`` (not both), else ``default``."""
    if argument is not None and option is not None:
        raise SdgenError("give the prompt either as an argument or with --prompt, not both")
    if argument is not None:
        return argument
    return option if option is not None else default


Options = TypeVar("Options")


def options_from_flags(cls: type[Options], command: str, flags: Mapping[str, Any], **values: Any) -> Options:
    """The options dataclass ``cls`` of ``command`` from a command function's flag values (its ``locals()``).

    The flags' spellings map onto the fields: the positional prompt or ``--prompt`` (:func:`prompt_from`),
    ``--plms`` / ``--dpm_solver`` / ``--sampler`` (:func:`pick_sampler`), ``--precision`` (its value),
    ``--no-watermark`` (``watermark``); other flags named like a field are copied, the rest (a command's own
    flags) left out. ``values`` set fields directly (they win).
    """
    flags = dict(flags)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    out: dict[str, Any] = {"command": command}
    if "prompt" in flags or "prompt_arg" in flags:
        out["prompt"] = prompt_from(flags.pop("prompt_arg", None), flags.pop("prompt", None))
    if "plms" in flags or "dpm_solver" in flags:
        out["sampler"] = pick_sampler(flags.pop("sampler", None), flags.pop("plms", False),
                                      flags.pop("dpm_solver", False))
    if isinstance(flags.get("precision"), Enum):
        flags["precision"] = flags["precision"].value
    if "no_watermark" in flags:
        out["watermark"] = not flags.pop("no_watermark")
    out.update({k: v for k, v in flags.items() if k in known and k not in out})
    out.update(values)
    return cls(**out)


def parse_pair(flag: str, value: Optional[str]) -> Optional[tuple[int, int]]:
    """``"1024,768"`` -> (1024, 768): two non-negative integers, height (or top) first as in SGM."""
    if value is None:
        return None
    parts = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
    try:
        pair = tuple(int(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise SdgenError(f"{flag} takes two non-negative integers HEIGHT,WIDTH (or TOP,LEFT), got {value!r}")
    return pair  # type: ignore[return-value]


def sdxl_settings(opts: Any, high_noise_frac: Optional[float] = None):
    """:class:`ldm.sdxl_pipeline.SDXLSettings` from the SDXL fields of ``opts`` (any object with them; None
    scores mean the SGM demo's 6.0 / 2.5, a None grid "sgm")."""
    from ldm.models.diffusion.engine import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE
    from ldm.sdxl_pipeline import SDXLSettings

    return SDXLSettings(
        grid=opts.grid or "sgm",
        high_noise_frac=high_noise_frac,
        original_size=parse_pair("--original-size", opts.original_size),
        crop_coords=parse_pair("--crop-coords", opts.crop_coords),
        target_size=parse_pair("--target-size", opts.target_size),
        aesthetic_score=AESTHETIC_SCORE if opts.aesthetic_score is None else opts.aesthetic_score,
        negative_aesthetic_score=(NEGATIVE_AESTHETIC_SCORE if opts.negative_aesthetic_score is None
                                  else opts.negative_aesthetic_score),
    )


# Flag declarations shared by the commands (Annotated aliases; defaults are set per command).
Prompt = Annotated[Optional[str], typer.Option("--prompt", help="the prompt to render", show_default=DEFAULT_PROMPT)]
PromptArg = Annotated[
    Optional[str], typer.Argument(metavar="PROMPT", help="the prompt (same as --prompt)", show_default=False)]
NegativePrompt = Annotated[
    str, typer.Option("--negative-prompt", "--negative_prompt", help="what to steer away from (replaces the empty "
                      "unconditional prompt of classifier-free guidance)")]
FromFile = Annotated[
    Optional[str], typer.Option("--from-file", "--from_file", help="read prompts from this file, one per line "
                                "(each line is one image per iteration)", show_default=False)]
Outdir = Annotated[str, typer.Option("--outdir", help="write results to this folder")]
SkipGrid = Annotated[bool, typer.Option("--skip_grid", "--skip-grid", help="do not save a grid, only samples")]
SkipSave = Annotated[bool, typer.Option("--skip_save", "--skip-save", help="do not save individual samples")]
Steps = Annotated[Optional[int], typer.Option(*STEPS_FLAGS, help="number of sampling steps")]
Plms = Annotated[bool, typer.Option("--plms", help="use PLMS sampling (= --sampler plms)")]
DpmSolver = Annotated[
    bool, typer.Option("--dpm_solver", "--dpm-solver", help="use DPM-Solver++(2M) (= --sampler dpmpp_2m)")]
# txt2img / img2img: an SDXL config takes the SGM demo's Euler; SDSampler / SafeSampler: the commands for SD
# 1.x / 2.x only (safe-txt2img falls back to the demo model)
Sampler = Annotated[Optional[str], typer.Option(
    "--sampler", help=sampler_help("ddim, euler for SDXL, dpmpp_2m for the demo model"), show_default=False)]
SDSampler = Annotated[Optional[str], typer.Option("--sampler", help=sampler_help("ddim"), show_default=False)]
SafeSampler = Annotated[Optional[str], typer.Option(
    "--sampler", help=sampler_help("ddim; dpmpp_2m for the demo model"), show_default=False)]
Eta = Annotated[
    float, typer.Option("--ddim_eta", "--ddim-eta", "--eta", help="DDIM eta (0.0 = deterministic sampling)")]
NIter = Annotated[Optional[int], typer.Option("--n_iter", "--n-iter", help="sample this often")]
# txt2img / img2img / safe-txt2img: unset takes the original script's default, or the config's own
ModelNIter = Annotated[Optional[int], typer.Option("--n_iter", "--n-iter", help="sample this often",
                                                   show_default="2; 1 for the demo model")]
Img2ImgNIter = Annotated[Optional[int], typer.Option("--n_iter", "--n-iter", help="sample this often",
                                                     show_default="1")]
NSamples = Annotated[
    int, typer.Option("--n_samples", "--n-samples", help="how many samples per prompt, a.k.a. batch size")]
NRows = Annotated[int, typer.Option("--n_rows", "--n-rows", help="images per grid row (0: n_samples)")]
SCALE_HELP = "classifier-free guidance scale (1.0: no guidance)"
Scale = Annotated[Optional[float], typer.Option("--scale", help=SCALE_HELP)]
Height = Annotated[Optional[int], size_option("height", "image {side} in pixels")]
Width = Annotated[Optional[int], size_option("width", "image {side} in pixels")]


def model_size_options(rule: str, show_default: str) -> tuple[Any, Any]:
    """The ``--H`` and ``--W`` option types of a command whose unset size is the model's default."""
    return tuple(Annotated[Optional[int], size_option(side, "image {side} in pixels", rule, show_default)]
                 for side in ("height", "width"))


# the same flags where an unset one takes the model family's default (txt2img, img2img)
ModelSteps = Annotated[
    Optional[int], typer.Option(*STEPS_FLAGS, show_default="50; 25 for the demo model",
                                help="number of sampling steps")]
ModelScale = Annotated[Optional[float], typer.Option(
    "--scale", show_default="7.5 (img2img 5.0); 5.0 for SDXL and the demo model", help=SCALE_HELP)]
ModelHeight, ModelWidth = model_size_options(ANY_SIZE_RULE, "512; 1024 for SDXL; 64 for the demo model")
# safe-txt2img: SD 1.x / 2.x only
SDModelScale = Annotated[Optional[float], typer.Option("--scale", show_default="7.5; 4.0 for the demo model",
                                                       help=SCALE_HELP)]
SDModelHeight, SDModelWidth = model_size_options(SD_SIZE_RULE, "512; 64 for the demo model")
LatentChannels = Annotated[int, typer.Option("--C", "--latent-channels", help="latent channels")]
Factor = Annotated[
    Optional[int], typer.Option("--f", "--downsampling-factor", show_default="the config's VAE factor",
                                help="VAE downsampling factor")]
Seed = Annotated[int, typer.Option("--seed", help="seed of image 0; image i of the run uses seed + i")]
FixedCode = Annotated[
    bool, typer.Option("--fixed_code", "--fixed-code", help="same starting noise for every batch (image k of "
                       "each batch uses seed + k)")]
Config = Annotated[
    Optional[str], typer.Option("--config", show_default="configs/stable-diffusion/v1-inference.yaml",
                                help="model config (YAML)")]
Ckpt = Annotated[
    Optional[str], typer.Option("--ckpt", show_default="models/ldm/stable-diffusion-v1/model.ckpt",
                                help="checkpoint (.ckpt or .safetensors)")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="autocast (fp16 on CUDA) | full | bf16 | fp16")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps")]
InitImg = Annotated[Optional[str], typer.Option("--init-img", "--init_img", help="path to the input image",
                                                show_default=False)]
Strength = Annotated[
    float, typer.Option("--strength", help="noising strength in (0, 1]; 1.0 destroys all information of the "
                        "init image")]
OptHeight = Annotated[Optional[int], size_option("height", "resize the init image to this {side}", ANY_SIZE_RULE,
                                                 "the init image's, rounded down")]
OptWidth = Annotated[Optional[int], size_option("width", "resize the init image to this {side}", ANY_SIZE_RULE,
                                                "the init image's, rounded down")]
SafetyCheckerPath = Annotated[
    Optional[str], typer.Option("--safety-checker", show_default="the model config's safety_checker entry",
                                help="safety checker weights (.safetensors/.bin/.ckpt of the released CLIP "
                                "concept checker); flagged images are saved black")]
NoSafetyChecker = Annotated[
    bool, typer.Option("--no-safety-checker", help="do not run the safety checker, even if weights are configured")]
NoWatermark = Annotated[
    bool, typer.Option("--no-watermark", help="do not embed the invisible watermark (dwtDct) of the original "
                       "scripts")]

# SDXL flags (txt2img / img2img with an SDXL config, and sdxl-refine)
OriginalSize = Annotated[
    Optional[str], typer.Option("--original-size", show_default="the image size",
                                help="SDXL micro-conditioning: apparent size of the training image, HEIGHT,WIDTH")]
CropCoords = Annotated[
    Optional[str], typer.Option("--crop-coords", show_default="0,0",
                                help="SDXL micro-conditioning: crop offset TOP,LEFT (0,0 = centred, uncropped look)")]
TargetSize = Annotated[
    Optional[str], typer.Option("--target-size", show_default="the image size",
                                help="SDXL base micro-conditioning: target size HEIGHT,WIDTH")]
AestheticScore = Annotated[
    Optional[float], typer.Option("--aesthetic-score", show_default="6.0",
                                  help="SDXL refiner: aesthetic score of the conditional branch")]
NegativeAestheticScore = Annotated[
    Optional[float], typer.Option("--negative-aesthetic-score", show_default="2.5",
                                  help="SDXL refiner: aesthetic score of the unconditional branch")]
Grid = Annotated[
    Optional[str], typer.Option("--grid", show_default="sgm", help="SDXL timestep grid: sgm = linspace(999, 0, "
                                "steps) as SGM since June 2023 and SDXL 1.0; sgm_legacy = range(0, 1000, 1000 // "
                                "steps) + 1 as the 0.9 release (refuses counts that reach t = 1000: 3, 37, ...)")]
