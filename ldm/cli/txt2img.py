"""``sdgen txt2img``: images from a text prompt (CompVis ``scripts/txt2img.py``, same flags and defaults)."""

from __future__ import annotations

from typing import Optional

import typer

from ldm.cli import options as o
from ldm.errors import SdgenError


def prompt_from(argument: Optional[str], option: Optional[str]) -> str:
    """The prompt from the positional argument or ``--prompt`` (not both), else the originals' default."""
    if argument is not None and option is not None:
        raise SdgenError("give the prompt either as an argument or with --prompt, not both")
    if argument is not None:
        return argument
    return option if option is not None else o.DEFAULT_PROMPT


def report(result) -> None:
    """The originals' closing line, on stdout."""
    written = len(result.samples)
    typer.echo(f"Your samples are ready and waiting for you here: {result.outdir} "
               f"({written} image{'s' if written != 1 else ''}, manifest {result.manifest.name})")


def txt2img(
    prompt_arg: o.PromptArg = None,
    prompt: o.Prompt = None,
    negative_prompt: o.NegativePrompt = "",
    from_file: o.FromFile = None,
    outdir: o.Outdir = "outputs/txt2img-samples",
    skip_grid: o.SkipGrid = False,
    skip_save: o.SkipSave = False,
    steps: o.Steps = 50,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.Sampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.NIter = 2,
    height: o.Height = 512,
    width: o.Width = 512,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 3,
    n_rows: o.NRows = 0,
    scale: o.Scale = 7.5,
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
    """Generate images from a text prompt (CompVis scripts/txt2img.py flags and defaults)."""
    from ldm.cli.run import execute

    options = o.GenerateOptions(
        command="txt2img",
        prompt=prompt_from(prompt_arg, prompt),
        negative_prompt=negative_prompt,
        from_file=from_file,
        outdir=outdir,
        skip_grid=skip_grid,
        skip_save=skip_save,
        steps=steps,
        sampler=o.pick_sampler(sampler, plms, dpm_solver),
        eta=eta,
        n_samples=n_samples,
        n_iter=n_iter,
        n_rows=n_rows,
        scale=scale,
        height=height,
        width=width,
        latent_channels=latent_channels,
        factor=factor,
        seed=seed,
        fixed_code=fixed_code,
        config=config,
        ckpt=ckpt,
        precision=precision.value,
        device=device,
        safety_checker=safety_checker,
        no_safety_checker=no_safety_checker,
        watermark=not no_watermark,
    )
    report(execute(options))
