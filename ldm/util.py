"""Config instantiation: ``target`` / ``params`` dictionaries -> objects.

The CompVis and Stability configs name classes by import path (``ldm.models.diffusion.ddpm.LatentDiffusion``,
``sgm.modules.encoders.modules.GeneralConditioner``). sdgen keeps the ``ldm.*`` layout, so those resolve
directly; the small alias table below maps upstream ``sgm.*`` paths (and the ``ldm.*`` ones sdgen keeps
elsewhere) to the sdgen classes, so users' own YAML files keep working.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from ldm.errors import SdgenError

# upstream target prefix -> sdgen target prefix (longest match wins)
TARGET_ALIASES: dict[str, str] = {
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.engine.DiffusionEngine",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.modules.GeneralConditioner": "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND",
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser": "ldm.sampling.denoiser.DiscreteDenoiser",
    "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "ldm.sampling.denoiser.EpsScaling",
    "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": "ldm.sampling.denoiser.VScaling",
    "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization": "ldm.sampling.schedules.LegacyDDPMDiscretization",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "ldm.models.diffusion.concat_models.LatentInpaintDiffusion",
    "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion":
        "ldm.models.diffusion.concat_models.LatentDepth2ImageDiffusion",
    "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion": "ldm.models.diffusion.concat_models.LatentUpscaleDiffusion",
    "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion": "ldm.models.diffusion.unclip.ImageEmbeddingConditionedLatentDiffusion",
    "ldm.modules.encoders.modules.ClipImageEmbedder": "ldm.modules.encoders.image_embedders.ClipImageEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder":
        "ldm.modules.encoders.image_embedders.FrozenOpenCLIPImageEmbedder",
    "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation":
        "ldm.modules.encoders.image_embedders.CLIPEmbeddingNoiseAugmentation",
    "ldm.lr_scheduler.LambdaLinearScheduler": "ldm.training.lr_scheduler.LambdaLinearScheduler",
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": "ldm.training.lr_scheduler.LambdaWarmUpCosineScheduler",
}


def resolve_target(target: str) -> str:
    """Map an upstream ``target`` string to the sdgen import path (identity when not aliased)."""
    return TARGET_ALIASES.get(target, target)


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name`` (after alias resolution)."""
    string = resolve_target(string)
    module_name, _, cls_name = string.rpartition(".")
    if not module_name:
        raise SdgenError(f"config target {string!r} is not a dotted import path")
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ModuleNotFoundError as exc:
        raise SdgenError(f"config target {string!r}: module {module_name!r} not found ({exc.name})") from exc
    try:
        return getattr(module, cls_name)
    except AttributeError as exc:
        raise SdgenError(f"config target {string!r}: module {module_name!r} has no {cls_name!r}") from exc


def instantiate_from_config(config: Mapping[str, Any] | Any, **extra: Any) -> Any:
    """Build ``config.target(**config.params, **extra)``.

    ``config`` is a dict or OmegaConf node with a ``target`` string and optional ``params`` mapping. The two
    placeholder values of the originals, ``__is_first_stage__`` and ``__is_unconditional__``, return None.
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not hasattr(config, "get") or config.get("target") is None:
        raise SdgenError(f"config entry has no 'target' to instantiate: {config!r}"[:300])
    cls = get_obj_from_str(str(config["target"]))
    params = config.get("params", None) or {}
    params = _to_container(params)
    try:
        return cls(**params, **extra)
    except TypeError as exc:
        raise SdgenError(f"config target {config['target']!r}: {exc}") from exc


def _to_container(node: Any) -> Any:
    """OmegaConf nodes -> plain dicts/lists (resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


def process_memory(field: str = "VmRSS") -> int:
    """A memory figure of this process in bytes from Linux ``/proc/self/status`` (``VmRSS``: resident now,
    ``VmHWM``: the peak resident so far); 0 where /proc is missing. Used by the benchmark scripts."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
