"""The checks of a run's options that need no model file: numbers, names, combinations, devices, and the hashes a
replay expects. Each failure is one :class:`~ldm.errors.SdgenError` line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.errors import SdgenError
from ldm.generation.options import FLAGS, GenerateOptions, parse_pair
from ldm.model_files import FILE_SDXL_BASE, FILE_SDXL_REFINER
from ldm.sampling.grids import SCHEDULES, SDXL_GRIDS, check_high_noise_frac
from ldm.sampling.samplers import SAMPLERS

PRECISIONS = ("autocast", "full", "bf16", "fp16")

#: What a replay's expected hashes compare, and what to say when they differ.
EXPECTATIONS = {
    "checkpoint_sha256": "the checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "refiner_checkpoint_sha256": "the refiner checkpoint differs from the one the manifest recorded (sha256 mismatch)",
    "init_image_sha256": "the init image differs from the one the manifest recorded (sha256 mismatch)",
    "prior_sha256": "the Karlo prior differs from the one the manifest recorded (sha256 mismatch)",
}


def check_adapter_hashes(recorded: Optional[Mapping[str, Any]], found: Mapping[str, Any]) -> None:
    """Refuse a replay whose LoRA, embedding or VAE files differ from the recorded ones (the manifest's
    ``adapters``: ``{"loras": [...], "embeddings": [...], "vae": ...}``, each with name and sha256)."""
    if not recorded:
        return
    for kind, label in (("loras", "LoRA"), ("embeddings", "embedding"), ("vae", "VAE")):
        want = recorded.get(kind) or []
        have = found.get(kind) or []
        want = [want] if isinstance(want, Mapping) else list(want)
        have = [have] if isinstance(have, Mapping) else list(have)
        now = {f["name"]: f["sha256"] for f in have}
        for entry in want:
            if entry["name"] not in now:
                raise SdgenError(f"the {label} {entry['name']} the run used is not found ({entry.get('path')})")
            if now[entry["name"]] != entry["sha256"]:
                raise SdgenError(f"the {label} file {entry['name']} differs from the one the manifest recorded "
                                 f"(sha256 {entry['sha256'][:12]} recorded, {now[entry['name']][:12]} now)")


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
    if opts.prior_steps is not None and not 1 <= opts.prior_steps <= 1000:
        raise SdgenError(f"--prior-steps must be in 1..1000 (the prior's 1000-step process), got {opts.prior_steps}")
    if opts.prior_scale is not None and not opts.prior_scale > 0:
        raise SdgenError(f"--prior-scale must be above 0 (1: no guidance), got {opts.prior_scale}")
    if opts.noise_level is not None and not 0 <= opts.noise_level <= 999:
        raise SdgenError(f"--noise-level must be in 0..999, got {opts.noise_level}")
    if (opts.s_churn or 0) < 0 or (opts.s_noise or 0) < 0:
        raise SdgenError("--s-churn and --s-noise must be >= 0")
    if opts.devices is not None and opts.devices < 1:
        raise SdgenError(f"--devices must be at least 1, got {opts.devices}")
    if opts.threads is not None and opts.threads < 1:
        raise SdgenError(f"--threads must be at least 1, got {opts.threads}")
    if opts.num_nodes < 1:
        raise SdgenError(f"--num-nodes must be at least 1, got {opts.num_nodes}")
    if opts.accelerator not in ("auto", "cpu", "cuda", "gpu"):
        raise SdgenError(f"unknown --accelerator {opts.accelerator!r} (auto, cpu, cuda)")
    if not opts.dist_timeout > 0:
        raise SdgenError(f"--dist-timeout must be a positive number of seconds, got {opts.dist_timeout}")
    if opts.schedule not in SCHEDULES:
        raise SdgenError(f"unknown --schedule {opts.schedule!r} ({', '.join(SCHEDULES)})")
    if opts.prompt_syntax not in ("a1111", "original"):
        raise SdgenError(f"unknown --prompt-syntax {opts.prompt_syntax!r} (a1111, original)")
    if not 1 <= opts.clip_skip <= 12:
        raise SdgenError(f"--clip-skip must be in 1..12 (1: the last layer, 2: the penultimate ...), got "
                         f"{opts.clip_skip}")
    if opts.low_memory and opts.command != "sdxl-refine":
        raise SdgenError("--low-memory applies to sdxl-refine (one of base and refiner in memory at a time)")
    if opts.resume and opts.skip_save:
        raise SdgenError("--resume finds the finished images by their files: it cannot go with --skip_save")
    if opts.command in ("img2img", "inpaint", "depth2img", "upscale") and not opts.init_img:
        raise SdgenError(f"{opts.command} needs an input image: pass --init-img PATH")
    if opts.command == "inpaint" and not opts.mask:
        raise SdgenError("inpaint needs a mask: pass --mask PATH (white = repaint, black = keep)")
    for flag, value, command in (("--mask", opts.mask, "inpaint"), ("--depth-map", opts.depth_map, "depth2img"),
                                 ("--tile", opts.tile or None, "upscale")):
        if value is not None and opts.command != command:
            raise SdgenError(f"{flag} applies to sdgen {command} only")
    if opts.command == "upscale" and opts.noise_level is not None and not 0 <= opts.noise_level <= 349:
        raise SdgenError(f"--noise-level must be in 0..349 (the upscaler's max_noise_level 350), got {opts.noise_level}")
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
