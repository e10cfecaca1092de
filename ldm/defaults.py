"""Every default of every generation command, in one table.

A run's unset options (None) are filled in this order: the model config's ``sampling_defaults`` (the bundled
demo model has its own), then the command's row for the model family (:data:`FAMILY_DEFAULTS`: "sd" for SD 1.x /
2.x / unCLIP, "sdxl" for SDXL), then the command's own values (:data:`COMMAND_DEFAULTS`). The ``--help`` texts
and the README's flag tables are generated from these tables (:func:`describe`), so they cannot drift.

Sources: CompVis ``scripts/txt2img.py`` / ``scripts/img2img.py`` (SD), the SGM demo ``scripts/demo/
streamlit_helpers.py`` (SDXL: EulerEDM, 50 steps, scale 5.0, 1024 x 1024, aesthetic scores 6.0 / 2.5), the SAI2
streamlit unCLIP demo (20 DDIM steps, scale 10, 768 x 768, 2 x 2 samples, noise level 0; with the Karlo prior its
``template.py`` "default" sampling: 25 prior steps, prior guidance 4.0), the SDXL model card (the base takes the noisiest 80 %
of the timesteps) and the SGM 0.9 demo's refinement strength 0.3.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"  # CV scripts/txt2img.py

#: The generation commands.
COMMANDS = ("txt2img", "img2img", "safe-txt2img", "unclip-variate", "sdxl-refine", "inpaint", "depth2img", "upscale")

#: The commands that fall back to the bundled demo model when no checkpoint is found.
DEMO_COMMANDS = ("txt2img", "img2img", "safe-txt2img", "inpaint")

UPSCALE_PROMPT = "a high quality professional photograph"  # SAI2 scripts/streamlit/superresolution.py

#: What a command sets whatever the model (None: nothing, the option stays unset).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "txt2img": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/txt2img-samples", "n_samples": 3, "seed": 42},
    "img2img": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/img2img-samples", "n_samples": 2, "seed": 42,
                "strength": 0.75},
    "safe-txt2img": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/safe-txt2img-samples", "n_samples": 3,
                     "seed": 42, "sld_preset": "medium"},
    "unclip-variate": {"prompt": "", "outdir": "outputs/unclip-samples", "n_samples": 2, "seed": 42,
                       "noise_level": 0},
    "sdxl-refine": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/sdxl-refine-samples", "n_samples": 1, "seed": 42,
                    "high_noise_frac": 0.8, "strength": 0.3, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 999.0,
                    "s_noise": 1.0},
    # the SAI2 streamlit scripts' defaults (seed 0, one sample); their prompts are typed in, so sdgen's default
    # prompt stands in for inpainting and depth
    "inpaint": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/inpaint-samples", "n_samples": 1, "seed": 0},
    "depth2img": {"prompt": DEFAULT_PROMPT, "outdir": "outputs/depth2img-samples", "n_samples": 1, "seed": 0,
                  "strength": 0.9},
    "upscale": {"prompt": UPSCALE_PROMPT, "outdir": "outputs/upscale-samples", "n_samples": 1, "seed": 0,
                "noise_level": 20},
}

_SD_TXT2IMG = {"sampler": "ddim", "steps": 50, "scale": 7.5, "height": 512, "width": 512, "n_iter": 2}
_UNCLIP = {"sampler": "ddim", "steps": 20, "scale": 10.0, "height": 768, "width": 768, "n_samples": 2, "n_iter": 2,
           "noise_level": 0}
_SDXL = {"sampler": "euler", "steps": 50, "scale": 5.0, "height": 1024, "width": 1024, "grid": "sgm",
         "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}

_INPAINT = {"sampler": "ddim", "steps": 50, "scale": 10.0, "n_iter": 1}

#: The sampling defaults of a command on a model family (img2img takes its size from the init image).
FAMILY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "txt2img": {"sd": _SD_TXT2IMG, "sdxl": {**_SDXL, "n_iter": 2},
                "unclip": {**_UNCLIP, "prior_steps": 25, "prior_scale": 4.0}},
    "img2img": {"sd": {"sampler": "ddim", "steps": 50, "scale": 5.0, "n_iter": 1},
                "sdxl": {**{k: v for k, v in _SDXL.items() if k not in ("height", "width")}, "n_iter": 1}},
    "safe-txt2img": {"sd": _SD_TXT2IMG, "sdxl": {**_SDXL, "n_iter": 2}},
    "unclip-variate": {"unclip": {k: v for k, v in _UNCLIP.items() if k != "noise_level"}},
    "sdxl-refine": {"sdxl": {**_SDXL, "n_iter": 1}},
    # SAI2 scripts/streamlit/inpainting.py l.142-146, depth2img.py l.125-138, superresolution.py l.132-144: DDIM
    # with eta 0 (the gradio inpainting demo's 45 steps, eta 1.0 and 4 samples are flags away)
    "inpaint": {"inpaint": _INPAINT, "sd": _INPAINT},
    "depth2img": {"depth": {"sampler": "ddim", "steps": 50, "scale": 9.0, "n_iter": 1}},
    "upscale": {"upscale": {"sampler": "ddim", "steps": 50, "scale": 9.0, "n_iter": 1}},
}

#: The fields a model config's ``sampling_defaults`` may set.
CONFIG_FIELDS = ("sampler", "steps", "scale", "height", "width", "n_iter", "grid")

FAMILY_NAMES = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL", "unclip": "unCLIP-L + Karlo prior", "inpaint": "inpainting",
                "depth": "depth-to-image", "upscale": "the x4 upscaler"}

#: Commands whose size is their input image's (img2img-like): a config's default size does not apply.
INPUT_SIZED = ("img2img", "inpaint", "depth2img", "upscale")


def config_sampling_defaults(config: Any) -> dict[str, Any]:
    """A loaded model config's own sampling defaults: its top-level ``sampling_defaults`` (over an SGM-style
    ``model.params.sampling_defaults``), restricted to :data:`CONFIG_FIELDS`."""
    out: dict[str, Any] = {}
    for node in (_get(_get(_get(config, "model"), "params"), "sampling_defaults"), _get(config, "sampling_defaults")):
        if node:
            out.update({str(k): _plain(v) for k, v in dict(node).items() if k in CONFIG_FIELDS})
    return out


def defaults_for(command: str, family: str, config: Any = None) -> dict[str, Any]:
    """Every default of ``command`` on a model of ``family`` with ``config`` (its sampling_defaults win)."""
    if command not in COMMAND_DEFAULTS:
        raise KeyError(f"unknown command {command!r}")
    out = dict(COMMAND_DEFAULTS[command])
    out.update(FAMILY_DEFAULTS[command].get(family, {}))
    own = config_sampling_defaults(config) if config is not None else {}
    if command in INPUT_SIZED:  # the size is the init image's
        own.pop("height", None)
        own.pop("width", None)
    out.update(own)
    return out


def families(command: str) -> tuple[str, ...]:
    """The model families ``command`` runs (its rows in :data:`FAMILY_DEFAULTS`)."""
    return tuple(FAMILY_DEFAULTS[command])


@functools.lru_cache(maxsize=None)
def demo_defaults() -> dict[str, Any]:
    """The bundled demo model's config ``sampling_defaults`` ({} when it is not installed)."""
    from ldm.bundled import bundled_path

    path = bundled_path("configs/demo/shapes-ldm.yaml")
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return config_sampling_defaults(OmegaConf.load(path))


def _fmt(value: Any) -> str:
    return "empty" if value == "" else str(value)


def describe(command: str, field: str) -> Optional[str]:
    """The default of ``field`` for ``command`` as ``--help`` states it, e.g. ``"50; 25 for the demo model"`` or
    ``"512; 1024 for SDXL; 64 for the demo model"``; None when the command has no default for it."""
    rows = FAMILY_DEFAULTS[command]
    values = [(family, rows[family][field]) for family in rows if field in rows[family]]
    if field in COMMAND_DEFAULTS[command]:  # the command's value, and the families that set another
        base = COMMAND_DEFAULTS[command][field]
    elif values:
        base = values[0][1]
    else:
        return None
    text = _fmt(base) + "".join(f"; {_fmt(v)} for {FAMILY_NAMES[f]}" for f, v in values if v != base)
    if command in DEMO_COMMANDS:
        demo = defaults_for(command, "sd", {"sampling_defaults": demo_defaults()}).get(field)
        if demo is not None and demo != base:
            text += f"; {_fmt(demo)} for the demo model"
    return text


def _get(node: Any, key: str) -> Any:
    return node.get(key, None) if hasattr(node, "get") else None


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value


__all__ = [
    "COMMANDS", "COMMAND_DEFAULTS", "FAMILY_DEFAULTS", "DEFAULT_PROMPT", "DEMO_COMMANDS", "config_sampling_defaults",
    "defaults_for", "demo_defaults", "describe", "families",
]
