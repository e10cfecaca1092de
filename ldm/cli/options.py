"""Shared command-line flags and the options dataclass the generation commands fill.

Every flag of the CompVis ``scripts/txt2img.py`` / ``scripts/img2img.py`` keeps its original spelling
(``--ddim_steps``, ``--n_samples``, ``--H`` ...) next to a dashed one (``--ddim-steps``, ``--steps``); the
defaults of each command live in its own module (txt2img.py, img2img.py) as the originals had them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Annotated, Any, Optional

import typer

from ldm.errors import SdgenError

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"  # CV scripts/txt2img.py
SAMPLER_NAMES = ("ddim", "plms", "dpmpp_2m", "euler", "euler_ancestral", "heun")


class Precision(str, Enum):
    """``autocast``: fp16 autocast on CUDA, fp32 elsewhere (the originals' default); ``full``: fp32;
    ``bf16``: bfloat16 autocast on any device (the CPU included); ``fp16``: float16 autocast (CUDA)."""

    autocast = "autocast"
    full = "full"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class GenerateOptions:
    """Everything a txt2img / img2img run is made from (the flags, resolved), stored in the run manifest.

    ``height``/``width`` are pixels (None for img2img: the init image's size); ``factor`` None means the
    config's VAE downsampling factor; ``config``/``ckpt`` None mean the original scripts' default paths.
    ``prompt_list`` (set by ``sdgen replay``) replaces reading ``from_file`` again. ``safety_checker`` is a
    checker weights file (None: the model config's ``safety_checker`` entry, if any); ``sld`` the Safe Latent
    Diffusion settings (:func:`ldm.sld_config.options_record`), None for plain classifier-free guidance.
    """

    command: str
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    from_file: Optional[str] = None
    outdir: str = "outputs/txt2img-samples"
    skip_grid: bool = False
    skip_save: bool = False
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    n_samples: int = 3
    n_iter: int = 2
    n_rows: int = 0
    scale: float = 7.5
    height: Optional[int] = 512
    width: Optional[int] = 512
    latent_channels: int = 4
    factor: Optional[int] = None
    seed: int = 42
    fixed_code: bool = False
    config: Optional[str] = None
    ckpt: Optional[str] = None
    precision: str = Precision.autocast.value
    device: str = "auto"
    init_img: Optional[str] = None
    strength: float = 0.75
    prompt_list: Optional[list[str]] = field(default=None)
    safety_checker: Optional[str] = None
    no_safety_checker: bool = False
    watermark: bool = True
    sld: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerateOptions":
        """Rebuild from a manifest's ``options`` (unknown keys from other versions are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def pick_sampler(sampler: Optional[str], plms: bool, dpm_solver: bool) -> str:
    """The sampler name from ``--sampler`` and the originals' ``--plms`` / ``--dpm_solver`` switches."""
    chosen = [name for name, on in (("plms", plms), ("dpmpp_2m", dpm_solver)) if on]
    if len(chosen) > 1:
        raise SdgenError("--plms and --dpm_solver exclude each other; pick one (or use --sampler)")
    if sampler is not None and chosen and chosen[0] != sampler:
        raise SdgenError(f"--sampler {sampler} contradicts --{'plms' if plms else 'dpm_solver'}")
    return sampler or (chosen[0] if chosen else "ddim")


def sampler_help() -> str:
    return "sampler: " + ", ".join(SAMPLER_NAMES) + " (default ddim; --plms / --dpm_solver pick those)"


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
Steps = Annotated[int, typer.Option("--ddim_steps", "--ddim-steps", "--steps", help="number of sampling steps")]
Plms = Annotated[bool, typer.Option("--plms", help="use PLMS sampling (= --sampler plms)")]
DpmSolver = Annotated[
    bool, typer.Option("--dpm_solver", "--dpm-solver", help="use DPM-Solver++(2M) (= --sampler dpmpp_2m)")]
Sampler = Annotated[Optional[str], typer.Option("--sampler", help=sampler_help(), show_default=False)]
Eta = Annotated[
    float, typer.Option("--ddim_eta", "--ddim-eta", "--eta", help="DDIM eta (0.0 = deterministic sampling)")]
NIter = Annotated[int, typer.Option("--n_iter", "--n-iter", help="sample this often")]
NSamples = Annotated[
    int, typer.Option("--n_samples", "--n-samples", help="how many samples per prompt, a.k.a. batch size")]
NRows = Annotated[int, typer.Option("--n_rows", "--n-rows", help="images per grid row (0: n_samples)")]
Scale = Annotated[float, typer.Option("--scale", help="classifier-free guidance scale (1.0: no guidance)")]
Height = Annotated[int, typer.Option("--H", "--height", help="image height in pixels (a multiple of 8 and of --f)")]
Width = Annotated[int, typer.Option("--W", "--width", help="image width in pixels (a multiple of 8 and of --f)")]
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
OptHeight = Annotated[
    Optional[int], typer.Option("--H", "--height", show_default="the init image's, rounded down",
                                help="resize the init image to this height")]
OptWidth = Annotated[
    Optional[int], typer.Option("--W", "--width", show_default="the init image's, rounded down",
                                help="resize the init image to this width")]
SafetyCheckerPath = Annotated[
    Optional[str], typer.Option("--safety-checker", show_default="the model config's safety_checker entry",
                                help="safety checker weights (.safetensors/.bin/.ckpt of the released CLIP "
                                "concept checker); flagged images are saved black")]
NoSafetyChecker = Annotated[
    bool, typer.Option("--no-safety-checker", help="do not run the safety checker, even if weights are configured")]
NoWatermark = Annotated[
    bool, typer.Option("--no-watermark", help="do not embed the invisible watermark (dwtDct) of the original "
                       "scripts")]
