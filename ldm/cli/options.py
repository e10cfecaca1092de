"""The command-line flags of the generation commands, and flags -> :class:`~ldm.generation.options.GenerateOptions`.

Every flag of the CompVis ``scripts/txt2img.py`` / ``scripts/img2img.py`` keeps its original spelling
(``--ddim_steps``, ``--n_samples``, ``--H`` ...) next to a dashed one (``--ddim-steps``, ``--steps``). A flag's
default is never written here: the flags default to None ("unset") and the ``--help`` text shows the command's
default from :mod:`ldm.defaults` (:func:`flags` builds each command's declarations from that table).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from enum import Enum
from types import SimpleNamespace
from typing import Annotated, Any, Callable, Mapping, Optional, Sequence

import typer

from ldm.defaults import describe
from ldm.errors import SdgenError
from ldm.generation.jobs import SWEEP_FIELDS
from ldm.generation.options import GenerateOptions
from ldm.sampling.samplers import SAMPLERS

#: The spellings of the step-count flag in every command (CompVis ``--ddim_steps``).
STEPS_FLAGS = ("--ddim_steps", "--ddim-steps", "--steps")

#: Image sides must be multiples of VAE factor x UNet downsampling (:func:`ldm.model_files.latent_size_multiple`).
SD_SIZE_RULE = "a multiple of 64 for SD 1.x / 2.x: VAE factor 8 x UNet downsampling 8"
SDXL_BASE_SIZE_RULE = "32 for the SDXL base"
ANY_SIZE_RULE = f"{SD_SIZE_RULE}; {SDXL_BASE_SIZE_RULE}"
SDXL_REFINER_SIZE_RULE = "a multiple of 64 with the SDXL refiner: VAE factor 8 x UNet downsampling 8"
UPSCALE_SIZE_RULE = "the output size: 4x the input, a multiple of 32 (VAE factor 4 x UNet downsampling 8)"
SIZE_RULES = {"unclip-variate": SD_SIZE_RULE, "sdxl-refine": SDXL_REFINER_SIZE_RULE, "inpaint": SD_SIZE_RULE,
              "depth2img": SD_SIZE_RULE, "upscale": UPSCALE_SIZE_RULE}

SCALE_HELP = "classifier-free guidance scale (1.0: no guidance)"
GRID_HELP = ("SDXL timestep grid: sgm = linspace(999, 0, steps) as SGM since June 2023 and SDXL 1.0; sgm_legacy = "
             "range(0, 1000, 1000 // steps) + 1 as the 0.9 release (refuses counts that reach t = 1000: 3, 37, ...)")


#: The options' own defaults (eta, latent channels, device ...): a command's signature takes them from here.
UNSET = GenerateOptions(command="")


class Precision(str, Enum):
    """``autocast``: fp16 autocast on CUDA, fp32 elsewhere (the originals' default); ``full``: fp32;
    ``bf16``: bfloat16 autocast on any device (the CPU included); ``fp16``: float16 autocast (CUDA)."""

    autocast = "autocast"
    full = "full"
    bf16 = "bf16"
    fp16 = "fp16"


def _opt(*names: str, help: str, default: Any = True, kind: Any = Optional[str]) -> Any:
    """An ``Annotated`` option type; ``default`` is what --help shows (True: the value, False: nothing)."""
    return Annotated[kind, typer.Option(*names, help=help, show_default=default)]


def _shown(command: str, field: str, fallback: Any = False) -> Any:
    text = describe(command, field) if command in _TABLE_COMMANDS else None
    return text if text is not None else fallback


_TABLE_COMMANDS = ("txt2img", "img2img", "safe-txt2img", "unclip-variate", "sdxl-refine", "inpaint", "depth2img",
                   "upscale")


def sampler_help(command: str) -> str:
    """``--sampler`` help: the names, the command's default and, where the command has them, the originals'
    ``--plms`` / ``--dpm_solver`` switches."""
    switches = command != "sdxl-refine"
    return (f"sampler: {', '.join(SAMPLERS)} (default {describe(command, 'sampler')}"
            + ("; --plms / --dpm_solver pick those)" if switches else ")")
            + "; plms on a v-prediction model needs more than 30 steps (a warning says so)")


def flags(command: str) -> SimpleNamespace:
    """The shared flag declarations of ``command`` (``Annotated`` types for its parameters), their shown defaults
    taken from :mod:`ldm.defaults`."""
    rule = SIZE_RULES.get(command, ANY_SIZE_RULE)
    int_, float_, bool_ = Optional[int], Optional[float], bool
    size_text = ("resize the init image to this {side}" if command in ("img2img", "inpaint", "depth2img")
                 else "output {side} (the input is resized to a quarter of it)" if command == "upscale"
                 else "image {side} in pixels")
    size_default = {"img2img": "the init image's, rounded down", "inpaint": "the init image's, rounded down",
                    "depth2img": "the init image's, rounded down", "upscale": "4x the init image's, rounded down",
                    "sdxl-refine": f"{describe(command, 'height')}, or the init image's"}.get(command)
    prompt_default = describe(command, "prompt")
    return SimpleNamespace(
        prompt_arg=Annotated[Optional[str], typer.Argument(metavar="PROMPT", help="the prompt (same as --prompt)",
                                                           show_default=False)],
        prompt=_opt("--prompt", help="the prompt to render" if prompt_default != "empty"
                    else "text mixed into the variations (default: none, the image embedding alone)",
                    default=prompt_default if prompt_default != "empty" else False),
        negative_prompt=_opt("--negative-prompt", "--negative_prompt", kind=str, help="what to steer away from "
                             "(replaces the empty unconditional prompt of classifier-free guidance)"),
        from_file=_opt("--from-file", "--from_file", default=False, help="read prompts from this file, one per line "
                       "(each line is one image per iteration)"),
        tags=_opt("--tags", kind=Optional[list[str]], default=False,
                  help="COLUMN: an extra .csv prompt-file column carried to the manifest as each image's metadata; "
                  "repeatable (the I2P benchmark's own columns are recognised)"),
        i2p_settings=_opt("--i2p-settings", kind=str, help="an I2P benchmark file's rows: row = their own guidance "
                          "scale and size (what the dataset card's reference percentages used) | fixed = this "
                          "command's (the authors' evaluation code: 7.5, 512 x 512)"),
        outdir=_opt("--outdir", help="write results to this folder", default=_shown(command, "outdir")),
        skip_grid=_opt("--skip_grid", "--skip-grid", kind=bool_, help="do not save a grid, only samples"),
        skip_save=_opt("--skip_save", "--skip-save", kind=bool_, help="do not save individual samples"),
        steps=_opt(*STEPS_FLAGS, kind=int_, help="number of sampling steps", default=_shown(command, "steps")),
        plms=_opt("--plms", kind=bool_, help="use PLMS sampling (= --sampler plms)"),
        dpm_solver=_opt("--dpm_solver", "--dpm-solver", kind=bool_, help="use DPM-Solver++(2M) (= --sampler dpmpp_2m)"),
        sampler=_opt("--sampler", help=sampler_help(command), default=_shown(command, "sampler")),
        schedule=_opt("--schedule", kind=str, help="A1111's schedule type: default (the sampler's own grid) | karras "
                      "| exponential | sgm_uniform (not with ddim / plms)"),
        eta=_opt("--ddim_eta", "--ddim-eta", "--eta", kind=float, help="DDIM eta (0.0 = deterministic sampling)"),
        n_iter=_opt("--n_iter", "--n-iter", kind=int_, help="sample this often", default=_shown(command, "n_iter")),
        height=_opt("--H", "--height", kind=int_, help=f"{size_text.format(side='height')} ({rule})",
                    default=size_default or _shown(command, "height")),
        width=_opt("--W", "--width", kind=int_, help=f"{size_text.format(side='width')} ({rule})",
                   default=size_default or _shown(command, "width")),
        latent_channels=_opt("--C", "--latent-channels", kind=int, help="latent channels"),
        factor=_opt("--f", "--downsampling-factor", kind=int_, help="VAE downsampling factor",
                    default="the config's VAE factor"),
        n_samples=_opt("--n_samples", "--n-samples", kind=int_, help="how many samples per prompt, a.k.a. batch size",
                       default=_shown(command, "n_samples")),
        n_rows=_opt("--n_rows", "--n-rows", kind=int, help="images per grid row (0: n_samples)"),
        scale=_opt("--scale", kind=float_, help=SCALE_HELP, default=_shown(command, "scale")),
        seed=_opt("--seed", kind=int_, help="seed of image 0; image i of the run uses seed + i",
                  default=_shown(command, "seed")),
        fixed_code=_opt("--fixed_code", "--fixed-code", kind=bool_, help="same starting noise for every batch "
                        "(image k of each batch uses seed + k)"),
        config=_opt("--config", help="model config (YAML)", default="configs/stable-diffusion/v1-inference.yaml"),
        ckpt=_opt("--ckpt", help="checkpoint (.ckpt or .safetensors)",
                  default="models/ldm/stable-diffusion-v1/model.ckpt"),
        precision=_opt("--precision", kind=Precision, help="autocast (fp16 on CUDA) | full | bf16 | fp16"),
        device=_opt("--device", kind=str, help="auto | cpu | cuda | cuda:N | mps"),
        safety_checker=_opt("--safety-checker", default="the model config's safety_checker entry",
                            help="safety checker weights (.safetensors/.bin/.ckpt of the released CLIP concept "
                            "checker); flagged images are saved black"),
        no_safety_checker=_opt("--no-safety-checker", kind=bool_,
                               help="do not run the safety checker, even if weights are configured"),
        no_watermark=_opt("--no-watermark", kind=bool_,
                          help="do not embed the invisible watermark (dwtDct) of the original scripts"),
        init_img=_opt("--init-img", "--init_img", help="path to the input image", default="required"),
        strength=_opt("--strength", kind=float_, default=_shown(command, "strength"),
                      help="noising strength in (0, 1]; 1.0 destroys all information of the init image"),
        grid=_opt("--grid", help=GRID_HELP, default=_shown(command, "grid", "sgm")),
        original_size=_opt("--original-size", default="the image size",
                           help="SDXL micro-conditioning: apparent size of the training image, HEIGHT,WIDTH"),
        crop_coords=_opt("--crop-coords", default="0,0",
                         help="SDXL micro-conditioning: crop offset TOP,LEFT (0,0 = centred, uncropped look)"),
        target_size=_opt("--target-size", default="the image size",
                         help="SDXL base micro-conditioning: target size HEIGHT,WIDTH"),
        aesthetic_score=_opt("--aesthetic-score", kind=float_, default=_shown(command, "aesthetic_score", describe("txt2img", "aesthetic_score")),
                             help="SDXL refiner: aesthetic score of the conditional branch"),
        sweep=_opt("--sweep", kind=Optional[list[str]], default=False,
                   help="FIELD=V1,V2,...: also run every value of a setting (repeat for an X/Y plot: the first "
                   "--sweep is X, the second Y) over the same seeds, and write a labelled grid; FIELD: "
                   + ", ".join(SWEEP_FIELDS)),
        resume=_opt("--resume", kind=bool_, help="continue the latest run in --outdir: make only its missing images "
                    "(the command must ask for the same images)"),
        devices=_opt("--devices", kind=int_, default="1, or what torchrun / SLURM started",
                     help="processes on this machine (one per GPU, or CPU processes); the images are the same for "
                     "any number"),
        threads=_opt("--threads", kind=int_, default="the cores / the processes on this machine",
                     help="CPU threads per process"),
        num_nodes=_opt("--num-nodes", kind=int, help="machines taking part (each started with the same command, "
                       "e.g. by torchrun or srun; --outdir on a shared file system)"),
        accelerator=_opt("--accelerator", kind=str, help="auto | cpu | cuda: what the processes run on"),
        dist_timeout=_opt("--dist-timeout", kind=float, help="seconds the processes wait for each other to connect"),
        engine=_opt("--engine", kind=str, help="torch: PyTorch eager | openvino: the UNet, the VAE and the text "
                    "encoders as OpenVINO models on the CPU (converted once and cached; the openvino extra)"),
        compile=_opt("--compile", kind=bool_, help="torch.compile the UNet (the first batch pays the compile time, "
                     "minutes on a CPU)"),
        vae_tiling=_opt("--vae-tiling", kind=bool_, help="decode in overlapping 512 px tiles, blended: bounded memory "
                        "for large images (a tiled decode differs slightly from a whole one)"),
        offload=_opt("--offload", kind=bool_, help="CUDA: keep the weights in host memory and move the text "
                     "encoder, UNet and VAE to the GPU only while each runs (GPU memory of one part at a time)"),
        low_memory=_opt("--low-memory", kind=bool_, help="keep only one of base and refiner in memory: the base "
                        "runs every batch, then the refiner (the same images; they appear at the end)"),
        prompt_syntax=_opt("--prompt-syntax", kind=str, help="a1111: (word:1.2) weights, [word], BREAK, "
                           "<lora:NAME:W> tags and prompts beyond 75 tokens; original: the scripts' conditioning "
                           "(brackets are words, cut at 77 tokens)"),
        clip_skip=_opt("--clip-skip", kind=int, help="use the text encoder's output this many layers from the end "
                       "(A1111: 1 = last layer, 2 = penultimate)"),
        lora=_opt("--lora", kind=Optional[list[str]], default=False,
                  help="PATH[:WEIGHT]: merge this LoRA (kohya or peft/diffusers layout) into the weights; repeatable"),
        lora_dir=_opt("--lora-dir", default="models/lora", help="folder where <lora:NAME:W> prompt tags find NAME"),
        embedding=_opt("--embedding", kind=Optional[list[str]], default=False,
                       help="textual-inversion file (.pt / .safetensors / .bin); its file name is the trigger word; "
                       "repeatable"),
        embeddings_dir=_opt("--embeddings-dir", default="models/embeddings",
                            help="every embedding in this folder can be named in prompts"),
        vae=_opt("--vae", default="the checkpoint's", help="replace the VAE with this file (original layout, e.g. "
                 "vae-ft-mse-840000-ema-pruned)"),
        negative_aesthetic_score=_opt("--negative-aesthetic-score", kind=float_,
                                      default=_shown(command, "negative_aesthetic_score",
                                                     describe("txt2img", "negative_aesthetic_score")),
                                      help="SDXL refiner: aesthetic score of the unconditional branch"),
    )


#: The flags every generation command shares, in --help order (``prompt_arg`` is the positional PROMPT).
COMMON_FLAGS = ("prompt_arg", "prompt", "negative_prompt", "from_file", "tags", "i2p_settings", "outdir", "skip_grid", "skip_save", "steps",
                "plms", "dpm_solver", "sampler", "schedule", "eta", "n_iter", "height", "width", "latent_channels", "factor",
                "n_samples", "n_rows", "scale", "seed", "fixed_code", "config", "ckpt", "precision", "device",
                "safety_checker", "no_safety_checker", "no_watermark")
#: The flags of a run at scale: sweeps, resume, and the processes / machines it runs on.
RUN_FLAGS = ("sweep", "resume", "devices", "threads", "num_nodes", "accelerator", "dist_timeout")
#: The prompt and adapter flags: prompt syntax, clip skip, LoRA, embeddings, VAE.
TEXT_FLAGS = ("prompt_syntax", "clip_skip", "lora", "lora_dir", "embedding", "embeddings_dir", "vae")
#: Speed and memory flags.
PERF_FLAGS = ("engine", "compile", "vae_tiling", "offload")
#: The SDXL grid and micro-conditioning flags.
SDXL_FLAGS = ("grid", "original_size", "crop_coords", "target_size", "aesthetic_score", "negative_aesthetic_score")

#: What a flag defaults to in a command's signature when it is not "unset" (None).
SIGNATURE_DEFAULTS: dict[str, Any] = {
    "negative_prompt": UNSET.negative_prompt, "eta": UNSET.eta, "latent_channels": UNSET.latent_channels,
    "n_rows": UNSET.n_rows, "precision": Precision(UNSET.precision), "device": UNSET.device,
    "skip_grid": False, "skip_save": False, "plms": False, "dpm_solver": False, "fixed_code": False,
    "no_safety_checker": False, "no_watermark": False, "resume": False, "num_nodes": UNSET.num_nodes,
    "accelerator": UNSET.accelerator, "dist_timeout": UNSET.dist_timeout, "prompt_syntax": UNSET.prompt_syntax,
    "clip_skip": UNSET.clip_skip, "schedule": UNSET.schedule, "compile": False, "vae_tiling": False,
    "low_memory": False, "offload": False, "i2p_settings": UNSET.i2p_settings, "engine": UNSET.engine,
}


def command(
    name: str,
    flag_names: Sequence[str],
    doc: str,
    *,
    own: Optional[Mapping[str, tuple[Any, Any]]] = None,
    options: Optional[Callable[[dict[str, Any]], GenerateOptions]] = None,
    action: Optional[Callable[[GenerateOptions], Any]] = None,
) -> Callable[..., None]:
    """A Typer command function for generation command ``name``: its parameters are the shared flags
    ``flag_names`` (:func:`flags`) and the command's ``own`` flags (``{name: (Annotated type, default)}``), in
    that order unless ``own`` names a shared flag's place; calling it turns the flags into options
    (``options``, default :func:`options_from_flags`) and runs them (``action``, default the run engine with a
    progress bar, :func:`ldm.cli.progress.run_command`)."""
    shared = flags(name)
    own = dict(own or {})
    parameters = []
    for flag in list(flag_names) + [n for n in own if n not in flag_names]:
        annotation, default = own[flag] if flag in own else (getattr(shared, flag), SIGNATURE_DEFAULTS.get(flag))
        parameters.append(inspect.Parameter(flag, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                            annotation=annotation))

    def run(**given: Any) -> None:
        opts = options(given) if options is not None else options_from_flags(name, given)
        if action is not None:
            action(opts)
        else:
            from ldm.cli.progress import run_command

            run_command(opts)

    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = name.replace("-", "_")
    run.__doc__ = doc
    return run


def pick_sampler(sampler: Optional[str], plms: bool, dpm_solver: bool) -> Optional[str]:
    """The sampler name from ``--sampler`` and the originals' ``--plms`` / ``--dpm_solver`` switches (None when
    none is given: the model's default)."""
    chosen = [name for name, on in (("plms", plms), ("dpmpp_2m", dpm_solver)) if on]
    if len(chosen) > 1:
        raise SdgenError("--plms and --dpm_solver exclude each other; pick one (or use --sampler)")
    if sampler is not None and chosen and chosen[0] != sampler:
        raise SdgenError(f"--sampler {sampler} contradicts --{'plms' if plms else 'dpm_solver'}")
    return sampler or (chosen[0] if chosen else None)


def prompt_from(argument: Optional[str], option: Optional[str]) -> Optional[str]:
    """The prompt from the positional argument or ``--prompt`` (not both); None when neither is given."""
    if argument is not None and option is not None:
        raise SdgenError("give the prompt either as an argument or with --prompt, not both")
    return argument if argument is not None else option


def options_from_flags(command: str, flags_given: Mapping[str, Any], **values: Any) -> GenerateOptions:
    """The :class:`GenerateOptions` of ``command`` from a command function's flag values (its ``locals()``).

    The flags' spellings map onto the fields: the positional prompt or ``--prompt`` (:func:`prompt_from`),
    ``--plms`` / ``--dpm_solver`` / ``--sampler`` (:func:`pick_sampler`), ``--precision`` (its value),
    ``--no-watermark`` (``watermark``); other flags named like a field are copied, the rest (a command's own
    flags) left out. ``values`` set fields directly (they win).
    """
    given = dict(flags_given)
    known = {f.name for f in fields(GenerateOptions)}
    out: dict[str, Any] = {"command": command}
    if "prompt" in given or "prompt_arg" in given:
        out["prompt"] = prompt_from(given.pop("prompt_arg", None), given.pop("prompt", None))
    if "plms" in given or "dpm_solver" in given or "sampler" in given:
        out["sampler"] = pick_sampler(given.pop("sampler", None), given.pop("plms", False),
                                      given.pop("dpm_solver", False))
    if isinstance(given.get("precision"), Enum):
        given["precision"] = given["precision"].value
    if "no_watermark" in given:
        out["watermark"] = not given.pop("no_watermark")
    for name in ("sweep", "lora", "embedding", "tags"):
        if name in given:
            out[name] = list(given.pop(name) or [])
    out.update({k: v for k, v in given.items() if k in known and k not in out})
    out.update(values)
    return GenerateOptions(**out)


def report(result: Any) -> None:
    """The originals' closing line, on stdout (only from process 0 of a run of several: the others get None)."""
    if result is None:
        return
    written = len(result.samples)
    typer.echo(f"Your samples are ready and waiting for you here: {result.outdir} "
               f"({written} image{'s' if written != 1 else ''}, manifest {result.manifest.name})")
