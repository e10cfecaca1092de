"""The Safe Latent Diffusion flags (Schramowski et al., 2022): a preset or a settings file, each field overridable,
and the safety concept; shared by ``safe-txt2img`` and ``unclip-variate``."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ldm.cli import options as o
from ldm.defaults import COMMAND_DEFAULTS
from ldm.sld_config import PRESET_NAMES, options_record, resolve_sld_params

PRESET = COMMAND_DEFAULTS["safe-txt2img"]["sld_preset"]


def _sld(*names: str, help: str, kind: Any = Optional[float], shown: Any = "the preset's") -> tuple[Any, None]:
    return Annotated[kind, typer.Option(*names, help=help, show_default=shown)], None


SLD_FLAGS = {
    "sld": _sld("--sld", kind=Optional[str], shown=PRESET, help="SLD preset: " + ", ".join(PRESET_NAMES)),
    "sld_config": _sld("--sld-config", "--sld_config", kind=Optional[str], shown=False,
                       help="SLD settings file (YAML: warmup_steps, guidance_scale, threshold, momentum_scale, "
                       "momentum_beta, optional safety_concept); replaces --sld"),
    "sld_guidance_scale": _sld("--sld-guidance-scale", "--sld_guidance_scale",
                               help="safety guidance scale s_S (>= 0; safety guidance is active above 1)"),
    "sld_warmup_steps": _sld("--sld-warmup-steps", "--sld_warmup_steps", kind=Optional[int],
                             help="sampler steps before the safety guidance is applied"),
    "sld_threshold": _sld("--sld-threshold", "--sld_threshold", help="threshold lambda: elements where "
                          "eps_prompt - eps_concept >= lambda get no safety guidance"),
    "sld_momentum_scale": _sld("--sld-momentum-scale", "--sld_momentum_scale", help="momentum scale s_m"),
    "sld_momentum_beta": _sld("--sld-momentum-beta", "--sld-mom-beta", "--sld_mom_beta",
                              help="momentum beta in [0, 1)"),
    "safety_concept": _sld("--safety-concept", "--safety_concept", kind=Optional[str],
                           shown="the paper's categories", help="text describing the content to steer away from"),
}


def sld_options(command: str, given: dict[str, Any], sld_always: bool = True):
    """The run's options with the SLD settings resolved (preset or file, each field overridable); without
    ``sld_always`` (commands where SLD is optional) no SLD flag given means plain classifier-free guidance."""
    sld = {name: given.pop(name) for name in SLD_FLAGS}
    if not sld_always and all(value is None for value in sld.values()):
        return o.options_from_flags(command, given)
    params = resolve_sld_params(
        sld["sld"] if sld["sld"] is not None or sld["sld_config"] is not None else PRESET, sld["sld_config"], guidance_scale=sld["sld_guidance_scale"], warmup_steps=sld["sld_warmup_steps"],
        threshold=sld["sld_threshold"], momentum_scale=sld["sld_momentum_scale"],
        momentum_beta=sld["sld_momentum_beta"], safety_concept=sld["safety_concept"],
    )
    source = str(sld["sld_config"]) if sld["sld_config"] is not None else (sld["sld"] or PRESET).strip().lower()
    return o.options_from_flags(command, given, sld=options_record(params, source))


def optional_sld_flags() -> dict[str, tuple[Any, None]]:
    """:data:`SLD_FLAGS` for a command where SLD is off unless asked for (``--sld`` shows no default preset)."""
    return {**SLD_FLAGS, "sld": _sld("--sld", kind=Optional[str], shown="none: plain guidance",
                                     help="SLD preset: " + ", ".join(PRESET_NAMES))}

