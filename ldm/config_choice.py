"""The config a checkpoint needs, when ``--config`` is not given.

In this order (the first that answers wins), and the reason is said in the run header:

1. a ``<checkpoint>.yaml`` beside the file (AUTOMATIC1111 honours the same convention);
2. what :func:`ldm.model_id.identify_file` says of the file: the layout of its keys (SD 1.x, SD 2.x, the SD 2
   inpainting / depth / x4-upscaler variants, SD 2.1 unCLIP L / H, SDXL base / refiner; SDXL 1.0 files have the
   0.9 layout and load with the same configs) and, for SD 2.x, whose 512 epsilon (v2-inference.yaml) and 768
   v-prediction (v2-inference-v.yaml) files have identical keys, the safetensors metadata
   ``modelspec.prediction_type`` ("v" / "epsilon") when present, else ComfyUI's rule on the population standard
   deviation of ``model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias`` (above 0.09: v).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.bundled import bundled_path
from ldm.errors import SdgenError
from ldm.model_id import KINDS, V_STATISTIC_KEY, V_STATISTIC_THRESHOLD, Identity, identify_file, v_statistic

PathLike = str | Path

#: Bundled config -> the model's name (from :data:`ldm.model_id.KINDS`).
NAMES = {info.config: info.name for info in KINDS.values() if info.config is not None}


@dataclass(frozen=True)
class ConfigChoice:
    """The chosen config file and why (one line for the run header); ``identity`` is what the checkpoint's keys
    say (None when a yaml beside the file decided)."""

    path: Path
    reason: str
    identity: Optional[Identity] = None


def choose_config(checkpoint: PathLike) -> ConfigChoice:
    """The config ``checkpoint`` needs (module docstring).

    Raises:
        SdgenError: its keys match no model (or it is a LoRA / embedding / VAE file, which the message says).
    """
    path = Path(checkpoint)
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return ConfigChoice(beside.resolve(), f"{beside.name} beside the checkpoint")
    identity = identify_file(path)
    if identity.kind is None:
        raise SdgenError(f"cannot tell which model {path.name} is from its keys: pass --config")
    if identity.config is None:
        raise SdgenError(f"{path.name} is {identity.describe()}, not a model checkpoint; {KINDS[identity.kind].hint}")
    return ConfigChoice(bundled_path(identity.config), f"{identity.name}: {'; '.join(identity.reasons)}", identity)


__all__ = ["ConfigChoice", "choose_config", "v_statistic", "NAMES", "V_STATISTIC_KEY", "V_STATISTIC_THRESHOLD"]
