"""``sdgen img2img``: variations of an input image (CompVis ``scripts/img2img.py``, same flags and defaults)."""

from __future__ import annotations

from ldm.cli import options as o
from ldm.cli.txt2img import prompt_from, report


def img2img(
    prompt_arg: o.PromptArg = None,
    prompt: o.Prompt = None,
    init_img: o.InitImg = None,
    strength: o.Strength = 0.75,
    negative_prompt: o.NegativePrompt = "",
    from_file: o.FromFile = None,
    outdir: o.Outdir = "outputs/img2img-samples",
    skip_grid: o.SkipGrid = False,
    skip_save: o.SkipSave = False,
    steps: o.Steps = 50,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.Sampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.NIter = 1,
    height: o.OptHeight = None,
    width: o.OptWidth = None,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 2,
    n_rows: o.NRows = 0,
    scale: o.Scale = 5.0,
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
    """Make variations of an input image guided by a prompt (CompVis scripts/img2img.py flags and defaults)."""
    from ldm.cli.run import execute

    options = o.GenerateOptions(
        command="img2img",
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
        init_img=init_img,
        strength=strength,
        safety_checker=safety_checker,
        no_safety_checker=no_safety_checker,
        watermark=not no_watermark,
    )
    report(execute(options))
