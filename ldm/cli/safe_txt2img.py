"""``sdgen safe-txt2img``: txt2img with Safe Latent Diffusion (Schramowski et al., 2022, arXiv 2211.05105).

The txt2img flags and defaults, plus the SLD settings: a preset (``--sld weak|medium|strong|max``, the
Safe Stable Diffusion model card's values, default medium = the authors' pipeline defaults) or a settings
file (``--sld-config PATH``), each field overridable by its flag, and the safety concept
(``--safety-concept``, default the paper's list of inappropriate categories). SLD changes no weights: it
works with any SD 1.x / 2.x checkpoint (eps or v).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ldm.cli import options as o
from ldm.cli.txt2img import report
from ldm.sld_config import PRESET_NAMES, SLDParams, options_record, resolve_sld_params

SLDPreset = Annotated[
    Optional[str], typer.Option("--sld", show_default="medium",
                                help="SLD preset: " + ", ".join(PRESET_NAMES))]
SLDConfigPath = Annotated[
    Optional[str], typer.Option("--sld-config", "--sld_config", show_default=False,
                                help="SLD settings file (YAML: warmup_steps, guidance_scale, threshold, "
                                "momentum_scale, momentum_beta, optional safety_concept); replaces --sld")]
SLDGuidanceScale = Annotated[
    Optional[float], typer.Option("--sld-guidance-scale", "--sld_guidance_scale", show_default="the preset's",
                                  help="safety guidance scale s_S (>= 0; safety guidance is active above 1)")]
SLDWarmupSteps = Annotated[
    Optional[int], typer.Option("--sld-warmup-steps", "--sld_warmup_steps", show_default="the preset's",
                                help="sampler steps before the safety guidance is applied")]
SLDThreshold = Annotated[
    Optional[float], typer.Option("--sld-threshold", "--sld_threshold", show_default="the preset's",
                                  help="threshold lambda: elements where eps_prompt - eps_concept >= lambda get "
                                  "no safety guidance")]
SLDMomentumScale = Annotated[
    Optional[float], typer.Option("--sld-momentum-scale", "--sld_momentum_scale", show_default="the preset's",
                                  help="momentum scale s_m")]
SLDMomentumBeta = Annotated[
    Optional[float], typer.Option("--sld-momentum-beta", "--sld-mom-beta", "--sld_mom_beta",
                                  show_default="the preset's", help="momentum beta in [0, 1)")]
SafetyConcept = Annotated[
    Optional[str], typer.Option("--safety-concept", "--safety_concept", show_default="the paper's categories",
                                help="text describing the content to steer away from")]


def sld_settings(
    preset: Optional[str],
    config_path: Optional[str],
    **overrides: object,
) -> tuple[str, SLDParams]:
    """(source label, validated settings) from the SLD flags; raises SdgenError on bad input."""
    params = resolve_sld_params(preset, config_path, **overrides)
    if config_path is not None:
        return str(config_path), params
    return (preset or "medium").strip().lower(), params


def safe_txt2img(
    prompt_arg: o.PromptArg = None,
    prompt: o.Prompt = None,
    sld: SLDPreset = None,
    sld_config: SLDConfigPath = None,
    sld_guidance_scale: SLDGuidanceScale = None,
    sld_warmup_steps: SLDWarmupSteps = None,
    sld_threshold: SLDThreshold = None,
    sld_momentum_scale: SLDMomentumScale = None,
    sld_momentum_beta: SLDMomentumBeta = None,
    safety_concept: SafetyConcept = None,
    negative_prompt: o.NegativePrompt = "",
    from_file: o.FromFile = None,
    outdir: o.Outdir = "outputs/safe-txt2img-samples",
    skip_grid: o.SkipGrid = False,
    skip_save: o.SkipSave = False,
    steps: o.ModelSteps = None,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.SafeSampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.ModelNIter = None,
    height: o.SDModelHeight = None,
    width: o.SDModelWidth = None,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 3,
    n_rows: o.NRows = 0,
    scale: o.SDModelScale = None,
    seed: o.Seed = 42,
    fixed_code: o.FixedCode = False,
    config: o.Config = None,
    ckpt: o.Ckpt = None,
    precision: o.PrecisionOpt = o.Precision.autocast,
    device: o.Device = "auto",
    safety_checker: o.SafetyCheckerPath = None,
    no_safety_checker: o.NoSafetyChecker = False,
    no_watermark: o.NoWatermark = False,
) -> None:
    """Generate images from a text prompt with Safe Latent Diffusion guidance away from inappropriate content."""
    flags = dict(locals())
    from ldm.cli.run import execute

    source, params = sld_settings(
        sld,
        sld_config,
        guidance_scale=sld_guidance_scale,
        warmup_steps=sld_warmup_steps,
        threshold=sld_threshold,
        momentum_scale=sld_momentum_scale,
        momentum_beta=sld_momentum_beta,
        safety_concept=safety_concept,
    )
    report(execute(o.options_from_flags(o.GenerateOptions, "safe-txt2img", flags, sld=options_record(params, source))))
