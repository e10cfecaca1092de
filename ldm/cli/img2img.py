"""``sdgen img2img``: variations of an input image (CompVis ``scripts/img2img.py``, same flags and defaults).

With an SDXL config the run is SDEdit on that model (SGM's img2img: the ``int(strength * (steps + 1))`` lowest
noise levels of the grid), with the SDXL micro-conditioning flags and the SGM demo's sampling defaults.
"""

from __future__ import annotations

from ldm.cli import options as o
from ldm.cli.txt2img import report


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
    steps: o.ModelSteps = None,
    plms: o.Plms = False,
    dpm_solver: o.DpmSolver = False,
    sampler: o.Sampler = None,
    eta: o.Eta = 0.0,
    n_iter: o.Img2ImgNIter = None,
    height: o.OptHeight = None,
    width: o.OptWidth = None,
    latent_channels: o.LatentChannels = 4,
    factor: o.Factor = None,
    n_samples: o.NSamples = 2,
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
    """Make variations of an input image guided by a prompt (CompVis scripts/img2img.py flags and defaults)."""
    from ldm.cli.run import execute

    report(execute(o.options_from_flags(o.GenerateOptions, "img2img", locals())))
