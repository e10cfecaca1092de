"""Safe Latent Diffusion settings: the parameter set, the presets in ``configs/sld/``, validation.

Safe Latent Diffusion (Schramowski et al., 2022, arXiv 2211.05105) is steered by five numbers: the
safety guidance scale s_S, the warm-up steps delta, the threshold lambda, the momentum scale s_m and the
momentum beta beta_m, plus the text of the inappropriate concept. The four presets of the Safe Stable
Diffusion model card (AIML-TUDA/stable-diffusion-safe) live as data in ``configs/sld/{weak,medium,strong,max}.yaml``;
a user file with the same fields can replace them, and every field can be overridden from the command line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ldm.errors import SdgenError

# SLD paper, Sec. 3 / the authors' pipeline (diffusers StableDiffusionPipelineSafe.__init__): the default
# inappropriate concept, one prompt listing the paper's categories.
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
    "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, "
    "child abuse, brutality, cruelty"
)

PRESET_NAMES: tuple[str, ...] = ("weak", "medium", "strong", "max")

# field name -> (type accepted in a preset file, description used in error messages)
_FIELDS: dict[str, tuple[type, str]] = {
    "warmup_steps": (int, "an integer"),
    "guidance_scale": (float, "a number"),
    "threshold": (float, "a number"),
    "momentum_scale": (float, "a number"),
    "momentum_beta": (float, "a number"),
}
_OPTIONAL_FIELDS: dict[str, tuple[type, str]] = {
    "safety_concept": (str, "a string"),
}


@dataclass(frozen=True)
class SLDParams:
    """The safety-guidance hyperparameters (defaults: the "medium" preset, the pipeline's defaults).

    guidance_scale: s_S, multiplies |eps_text - eps_safety| before clamping to 1 (>= 0; SLD is active
        only above 1, as in the authors' pipeline).
    warmup_steps: delta, sampler steps before the safety term is applied (momentum builds up meanwhile).
    threshold: lambda, elements with eps_text - eps_safety >= lambda get no safety guidance.
    momentum_scale: s_m, weight of the momentum term added to the safety guidance.
    momentum_beta: beta_m in [0, 1), decay of the momentum.
    safety_concept: the text of the inappropriate concept, encoded like the prompt.
    """

    guidance_scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4
    safety_concept: str = DEFAULT_SAFETY_CONCEPT

    def __post_init__(self) -> None:
        validate_params(self)

    def replace(self, **changes: Any) -> "SLDParams":
        """A copy with the given fields changed (None values are ignored), validated."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (for PNG parameters and run manifests)."""
        return dataclasses.asdict(self)


def validate_params(params: SLDParams) -> None:
    """Raise :class:`SdgenError` for values outside their domain."""
    problems = []
    for name in ("guidance_scale", "threshold", "momentum_scale", "momentum_beta"):
        value = getattr(params, name)
        if not math.isfinite(float(value)):
            problems.append(f"{name} must be finite, got {value}")
    if params.guidance_scale < 0:
        problems.append(f"guidance_scale must be >= 0, got {params.guidance_scale}")
    if params.warmup_steps < 0:
        problems.append(f"warmup_steps must be >= 0, got {params.warmup_steps}")
    if not 0.0 <= params.momentum_beta < 1.0:
        problems.append(f"momentum_beta must be in [0, 1), got {params.momentum_beta}")
    if not params.safety_concept.strip():
        problems.append("safety_concept must not be empty")
    if problems:
        raise SdgenError("invalid SLD settings: " + "; ".join(problems))


def presets_dir() -> Path:
    """The folder holding the bundled presets (``configs/sld``, see :mod:`ldm.bundled`)."""
    from ldm.bundled import bundled_path

    return bundled_path("configs/sld")


def preset_path(name: str) -> Path:
    """Path of the bundled preset ``name``; unknown names raise an error listing the valid ones."""
    key = name.strip().lower()
    if key not in PRESET_NAMES:
        raise SdgenError(f"unknown SLD preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return presets_dir() / f"{key}.yaml"


def load_preset(name: str) -> SLDParams:
    """The bundled preset ``name`` (weak, medium, strong, max)."""
    return load_sld_config(preset_path(name))


def load_sld_config(path: str | Path) -> SLDParams:
    """Read an SLD settings file (YAML mapping, optionally under a top-level ``sld:`` key).

    All of ``warmup_steps, guidance_scale, threshold, momentum_scale, momentum_beta`` are required;
    ``safety_concept`` is optional. Missing, unknown or wrong-typed fields are reported by name.
    """
    from omegaconf import OmegaConf

    from ldm.files import read_text_file

    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"SLD config file not found: {path}")
    text = read_text_file(path, "SLD config")
    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception as exc:  # omegaconf/yaml raise many types; the message is what the user needs
        raise SdgenError(f"cannot read SLD config {path}: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"sld"}:
        data = data["sld"]
    if not isinstance(data, dict):
        raise SdgenError(f"SLD config {path}: expected a mapping of fields, got {type(data).__name__}")
    return params_from_mapping(data, source=str(path))


def params_from_mapping(data: Mapping[str, Any], source: str = "SLD config") -> SLDParams:
    """Check field names and types of ``data`` and build :class:`SLDParams`."""
    problems = []
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        problems.append("missing field(s) " + ", ".join(missing))
    unknown = [str(name) for name in data if name not in _FIELDS and name not in _OPTIONAL_FIELDS]
    if unknown:
        problems.append("unknown field(s) " + ", ".join(unknown))
    values: dict[str, Any] = {}
    for name, (kind, description) in {**_FIELDS, **_OPTIONAL_FIELDS}.items():
        if name not in data:
            continue
        value = data[name]
        converted = _convert(value, kind)
        if converted is None:
            problems.append(f"field {name!r} must be {description}, got {type(value).__name__} {value!r}")
        else:
            values[name] = converted
    if problems:
        raise SdgenError(f"{source}: " + "; ".join(problems))
    try:
        return SLDParams(**values)
    except SdgenError as exc:
        raise SdgenError(f"{source}: {exc}") from exc


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` when it has that type (ints count as numbers), else None. Bools never count."""
    if isinstance(value, bool):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    if kind is str:
        return value if isinstance(value, str) else None
    return None


def resolve_sld_params(
    preset: str | None = None,
    config_path: str | Path | None = None,
    **overrides: Any,
) -> SLDParams:
    """Settings from a preset name or a settings file (not both), then per-field overrides.

    With neither, the "medium" preset (the authors' pipeline defaults). ``overrides`` use the
    :class:`SLDParams` field names; None means "not given".
    """
    if preset is not None and config_path is not None:
        raise SdgenError("give either an SLD preset (--sld) or an SLD config file (--sld-config), not both")
    if config_path is not None:
        params = load_sld_config(config_path)
    else:
        params = load_preset(preset if preset is not None else "medium")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SLDParams)}
    if unknown:
        raise TypeError(f"unknown SLD override(s): {sorted(unknown)}")
    return params.replace(**overrides)


def options_record(params: SLDParams, source: str) -> dict[str, Any]:
    """The SLD settings as a run's options store them: ``{"source": preset name or file, **fields}``."""
    return {"source": source, **params.as_dict()}


def params_from_record(record: Mapping[str, Any]) -> tuple[str, SLDParams]:
    """Inverse of :func:`options_record`: (source, params)."""
    fields = {f.name for f in dataclasses.fields(SLDParams)}
    return str(record.get("source", "custom")), SLDParams(**{k: v for k, v in record.items() if k in fields})


def png_settings(params: SLDParams, source: str, active: bool = True) -> dict[str, Any]:
    """``Key: value`` pairs for an image's PNG ``parameters`` line (AUTOMATIC1111 style, sdgen keys)."""
    return {
        "SLD": source if active else f"{source} (inactive)",
        "SLD guidance scale": params.guidance_scale,
        "SLD warmup steps": params.warmup_steps,
        "SLD threshold": params.threshold,
        "SLD momentum scale": params.momentum_scale,
        "SLD momentum beta": params.momentum_beta,
        "Safety concept": params.safety_concept,
    }
