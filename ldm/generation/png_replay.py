"""``sdgen replay IMAGE.png``: run the image again from the generation parameters it carries.

The ``parameters`` text chunk is AUTOMATIC1111's format (sdgen writes it too): the prompt, ``Negative prompt:``
and a ``Key: value`` line. The checkpoint is found by its ``Model hash`` (sha256[:10]) among ``--ckpt``, the
files of ``--models-dir``, the default checkpoint paths and the bundled demo model; the config is picked from
the checkpoint (:mod:`ldm.config_choice`). LoRA tags stay in the prompt (looked up in ``--models-dir``),
embeddings too. Fields sdgen does not act on are listed in one
warning and ignored. The image's own seed is its ``Seed``, so one image is made, with that seed.

An sdgen PNG also holds its job record (``sdgen-job``): its exact settings (precision, grid, churn, SLD) are
taken from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from ldm.errors import SdgenError
from ldm.generation.options import GenerateOptions
from ldm.generation.records import SAMPLER_LABELS, SCHEDULE_LABELS
from ldm.output import read_job

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
#: A1111 keys that only describe the image or its batch (nothing to act on).
DESCRIPTIVE = {"prompt", "negative_prompt", "Model", "Version", "Batch size", "Batch pos", "Safety checker",
               "Watermark", "Lora hashes", "TI hashes", "VAE", "Init image", "Model hash"}


def _number(fields: dict, key: str, kind: Callable = float) -> Any:
    try:
        return kind(fields[key])
    except (KeyError, ValueError):
        return None


def sampler_and_schedule(label: str) -> tuple[str, str]:
    """A1111's sampler name (with an old-style schedule suffix, "DPM++ 2M Karras") -> (sampler, schedule)."""
    by_label = {v.lower(): k for k, v in SAMPLER_LABELS.items()}
    text = label.strip()
    for name, suffix in (("karras", " Karras"), ("exponential", " Exponential")):
        if text.endswith(suffix) and text[: -len(suffix)].lower() in by_label:
            return by_label[text[: -len(suffix)].lower()], name
    if text.lower() not in by_label:
        raise SdgenError(f"the image's sampler {label!r} is not one sdgen has ({', '.join(SAMPLER_LABELS.values())})")
    return by_label[text.lower()], "default"


def find_checkpoint(short_hash: str, candidates: list[Path]) -> Path:
    """The file among ``candidates`` whose sha256 starts with ``short_hash`` (A1111's 10 hex digits)."""
    from ldm.model_files import file_sha256

    short = short_hash.strip().lower()
    if len(short) < 10:
        raise SdgenError(f"Model hash {short_hash} is an old 8-digit A1111 hash sdgen cannot match: pass --ckpt and "
                         "--config")
    for path in candidates:
        if file_sha256(path).startswith(short):
            return path
    raise SdgenError(f"no checkpoint with Model hash {short} among --ckpt / --models-dir, the default checkpoint "
                     f"paths and the demo model ({len(candidates)} files looked at): pass --ckpt or --models-dir")


def default_checkpoints() -> list[Path]:
    """The checkpoints a run finds without ``--ckpt`` that exist here: the original scripts' default paths
    (:data:`ldm.model_files.DEFAULT_CKPT`, the unCLIP-L, inpainting, depth and x4-upscaler checkpoints, the Karlo
    prior; working directory first, then the bundled files) and the bundled demo model."""
    from ldm import model_files as mf
    from ldm.models.prior.files import DEFAULT_PRIOR

    found = [mf.find_file(p) for p in (mf.DEFAULT_CKPT, mf.DEFAULT_UNCLIP_CKPT, mf.DEFAULT_INPAINT_CKPT,
                                       mf.DEFAULT_DEPTH_CKPT, mf.DEFAULT_UPSCALE_CKPT, DEFAULT_PRIOR)]
    demo = mf.demo_model_files()
    return [p for p in found if p.is_file()] + ([demo.checkpoint] if demo is not None else [])


def checkpoint_candidates(ckpt: Optional[str], models_dir: Optional[str]) -> list[Path]:
    """Where a PNG's checkpoint is looked for, in order: ``--ckpt``, the files of ``--models-dir``, then
    :func:`default_checkpoints` (a first replay needs no flag for an image of the demo model)."""
    out = [Path(ckpt).expanduser()] if ckpt else []
    if models_dir:
        root = Path(models_dir).expanduser()
        if not root.is_dir():
            raise SdgenError(f"--models-dir {models_dir} is not a folder")
        out += sorted(p for p in root.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
    out += [p for p in default_checkpoints() if p not in out]
    return [p for p in out if p.is_file()]


def options_from_png(path: str | Path, *, ckpt: Optional[str] = None, models_dir: Optional[str] = None,
                     outdir: Optional[str] = None, device: Optional[str] = None,
                     init_img: Optional[str] = None, mask: Optional[str] = None,
                     depth_map: Optional[str] = None) -> tuple[GenerateOptions, list[str]]:
    """(options that make the image again, the fields ignored) from a PNG's parameters."""
    from ldm.files import require_file
    from ldm.output import read_parameters

    png = require_file(path, "image")
    fields = read_parameters(png)
    job = read_job(png) or {}
    settings = dict(job.get("settings") or {})
    if "Seed" not in fields:
        raise SdgenError(f"{png.name}: its parameters have no Seed; it was not written by sdgen or AUTOMATIC1111")
    sampler, schedule = sampler_and_schedule(fields.get("Sampler", "Euler"))
    schedule = next((k for k, v in SCHEDULE_LABELS.items() if v == fields.get("Schedule type")), schedule)
    width, _, height = str(fields.get("Size", "512x512")).partition("x")
    candidates = checkpoint_candidates(ckpt, models_dir)
    if "Model hash" in fields:
        checkpoint = find_checkpoint(fields["Model hash"], candidates)
    elif ckpt:
        checkpoint = Path(ckpt)
    else:
        raise SdgenError(f"{png.name}: its parameters name no Model hash: pass --ckpt")
    values: dict[str, Any] = {
        "prompt": fields.get("prompt", ""), "negative_prompt": fields.get("negative_prompt", ""),
        "steps": _number(fields, "Steps", int), "sampler": sampler, "schedule": schedule,
        "scale": _number(fields, "CFG scale"), "seed": _number(fields, "Seed", int), "width": int(width),
        "height": int(height), "n_samples": 1, "n_iter": 1, "ckpt": str(checkpoint), "outdir": outdir,
        "clip_skip": _number(fields, "Clip skip", int) or 1, "eta": _number(fields, "Eta DDIM") or 0.0,
        "prompt_syntax": fields.get("Prompt syntax", "a1111"), "skip_grid": True,
    }
    if models_dir:
        values.update(lora_dir=models_dir, embeddings_dir=models_dir)
    used = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "Eta DDIM", "Prompt syntax"}
    command = "txt2img"
    input_command = _input_command(checkpoint, fields)
    if input_command is not None:  # inpaint / depth2img / upscale: the image's inputs are needed again
        command = input_command
        given = {"init_img": init_img, "mask": mask if command == "inpaint" else None,
                 "depth_map": depth_map if "Depth map" in fields else None}
        needed = {"init_img": "--init-img", **({"mask": "--mask"} if command == "inpaint" else {}),
                  **({"depth_map": "--depth-map"} if "Depth map" in fields else {})}
        missing = [flag for name, flag in needed.items() if not given[name]]
        if missing:
            raise SdgenError(f"{png.name} was made by sdgen {command}: pass its inputs with {' and '.join(missing)}"
                             f" ({', '.join(str(fields.get(k)) for k in ('Init image', 'Mask', 'Depth map') if k in fields)})")
        values.update({k: v for k, v in given.items() if v is not None})
        if command == "depth2img":
            values["strength"] = _number(fields, "Denoising strength")
        if command == "upscale":
            values["noise_level"] = _number(fields, "Noise level", int)
        used |= {"Denoising strength", "Noise level", "Init image", "Mask", "Depth map"}
    elif "Denoising strength" in fields:
        command = "img2img"
        if not init_img:
            raise SdgenError(f"{png.name} was made by img2img (Denoising strength {fields['Denoising strength']}): "
                             "pass its input image with --init-img")
        values.update(init_img=init_img, strength=_number(fields, "Denoising strength"))
        used.add("Denoising strength")
    for key, name in (("Original size", "original_size"), ("Crop", "crop_coords"), ("Target size", "target_size")):
        if key in fields:
            values[name] = str(fields[key])
            used.add(key)
    if "Refiner" in fields:  # SDXL base -> refiner: "Refiner: NAME [HASH]"
        refiner_hash = str(fields["Refiner"]).rpartition("[")[2].rstrip("]")
        command = "sdxl-refine"
        values.update(refiner_ckpt=str(find_checkpoint(refiner_hash, candidates)),
                      high_noise_frac=_number(fields, "Refiner switch at"))
        score = str(fields.get("Aesthetic score", ""))
        if "/" in score:
            values["aesthetic_score"], values["negative_aesthetic_score"] = (float(v) for v in score.split("/"))
        used |= {"Refiner", "Refiner switch at", "Aesthetic score"}
    if "Prior" in fields:  # unCLIP-L text-to-image: "Prior: NAME [HASH]", found like the checkpoint
        prior_hash = str(fields["Prior"]).rpartition("[")[2].rstrip("]")
        values.update(prior=str(find_checkpoint(prior_hash, candidates)),
                      prior_steps=_number(fields, "Prior steps", int), prior_scale=_number(fields, "Prior scale"),
                      noise_level=_number(fields, "Noise level", int))
        used |= {"Prior", "Prior steps", "Prior scale", "Noise level"}
    if str(fields.get("Engine", "")).startswith("openvino"):
        values["engine"] = "openvino"
        used.add("Engine")
    if settings:  # sdgen's own record: the exact settings
        values.update(precision=settings.get("precision", "autocast"), eta=settings.get("eta", values["eta"]))
        if settings.get("sld"):
            command = "safe-txt2img" if command == "txt2img" else command
            values["sld"] = settings["sld"]
        for name in ("s_churn", "s_tmin", "s_noise"):
            if settings.get(name):
                values[name] = settings[name]
        used |= {"Precision", "SLD", "SLD guidance scale", "SLD warmup steps", "SLD threshold", "SLD momentum scale",
                 "SLD momentum beta", "Safety concept", "S churn", "Timestep grid", "Original size", "Crop",
                 "Target size"}
        if settings.get("grid") in ("sgm", "sgm_legacy"):
            values["grid"] = settings["grid"]
    if device:
        values["device"] = device
    ignored = sorted(k for k in fields if k not in used and k not in DESCRIPTIVE)
    opts = GenerateOptions(command=command, **{k: v for k, v in values.items() if v is not None})
    return opts, ignored


def _input_command(checkpoint: Path, fields: dict[str, Any]) -> Optional[str]:
    """The input command that made an image: its checkpoint's (:func:`ldm.model_id.identify_file`), or inpaint for
    an ordinary checkpoint when the parameters name a mask; None for the other commands."""
    from ldm.model_id import identify_file

    command = identify_file(checkpoint).command
    if command in ("inpaint", "depth2img", "upscale"):
        return command
    return "inpaint" if "Mask" in fields else None


__all__ = ["checkpoint_candidates", "default_checkpoints", "find_checkpoint", "options_from_png",
           "sampler_and_schedule"]
