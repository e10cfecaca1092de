"""``sdgen txt2img``: images from a text prompt (CompVis ``scripts/txt2img.py``, same flags and defaults).

With an SDXL config (``--config configs/sdxl/sd_xl_base.yaml``) the run goes through the SDXL pipeline, takes
the SDXL micro-conditioning flags, and the unset sampling flags take the SGM demo's defaults.
"""

from __future__ import annotations

import typer

from ldm.cli import options as o


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
    steps: o.ModelSteps = None,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.Sampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.ModelNIter = None,
    height: o.ModelHeight = None,
    width: o.ModelWidth = None,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 3,
    n_rows: o.NRows = 0,
    scale: o.ModelScale = None,
    seed: o.Seed = 42,
    fixed_code: o.FixedCode = False,
    config: o.Config = None,
    ckpt: o.Ckpt = None,
    precision: o.PrecisionOpt = o.Precision.autocast,
    device: o.Device = "auto",
    safety_checker: o.SafetyCheckerPath = None,
    no_safety_checker: o.NoSafetyChecker = False,
    no_watermark: o.NoWatermark = False,
    grid: o.Grid = None,
    original_size: o.OriginalSize = None,
    crop_coords: o.CropCoords = None,
    target_size: o.TargetSize = None,
    aesthetic_score: o.AestheticScore = None,
    negative_aesthetic_score: o.NegativeAestheticScore = None,
) -> None:
    """Generate images from a text prompt (CompVis scripts/txt2img.py flags and defaults; SDXL configs too)."""
    from ldm.cli.run import execute

    report(execute(o.options_from_flags(o.GenerateOptions, "txt2img", locals())))
