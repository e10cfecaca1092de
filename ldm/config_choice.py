"""The config a checkpoint needs, when ``--config`` is not given.

In this order (the first that answers wins), and the reason is said in the run header:

1. a ``<checkpoint>.yaml`` beside the file (AUTOMATIC1111 honours the same convention);
2. the layout of the keys (:func:`ldm.model_files.guess_config`): SD 1.x (CLIP-L text encoder), SD 2.x (OpenCLIP
   ``cond_stage_model.model``), SD 2.1 unCLIP L / H, SDXL base (two text encoders) / refiner (one). SDXL 1.0 files
   have the 0.9 layout and load with the same configs;
3. SD 2.x only, whose 512 epsilon (v2-inference.yaml) and 768 v-prediction (v2-inference-v.yaml) files have
   identical keys: the safetensors metadata ``modelspec.prediction_type`` ("v" / "epsilon") when present, else
   the published rule of ComfyUI's model detection: the population standard deviation of
   ``model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 for v-prediction
   checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import SdgenError
from ldm.model_files import (
    CONFIG_SD2,
    CONFIG_SD2V,
    PathLike,
    bundled_config,
    checkpoint_shapes,
    guess_config,
)

V_STATISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_STATISTIC_THRESHOLD = 0.09  # ComfyUI supported_models.SD20.model_type

NAMES = {
    "configs/stable-diffusion/v1-inference.yaml": "SD 1.x",
    CONFIG_SD2: "SD 2.x 512 (epsilon)",
    CONFIG_SD2V: "SD 2.x 768-v (v-prediction)",
    "configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml": "SD 2.1 unCLIP-L",
    "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml": "SD 2.1 unCLIP-H",
    "configs/sdxl/sd_xl_base.yaml": "SDXL base",
    "configs/sdxl/sd_xl_refiner.yaml": "SDXL refiner",
}


@dataclass(frozen=True)
class ConfigChoice:
    """The chosen config file and why (one line for the run header)."""

    path: Path
    reason: str


def _metadata(path: Path) -> dict:
    from ldm.checkpoint_reader import is_safetensors, safetensors_header

    if not is_safetensors(path):
        return {}
    return dict(safetensors_header(path).get("__metadata__") or {})


def v_statistic(path: Path) -> Optional[float]:
    """The population std of :data:`V_STATISTIC_KEY` in the checkpoint (None when it lacks the tensor)."""
    from ldm.checkpoint_reader import is_safetensors, read_state_dict

    if is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            if V_STATISTIC_KEY not in handle.keys():
                return None
            tensor = handle.get_tensor(V_STATISTIC_KEY)
    else:
        tensor = read_state_dict(path).get(V_STATISTIC_KEY)
        if tensor is None:
            return None
    return float(tensor.float().std(unbiased=False))


def sd2_prediction(path: Path) -> tuple[str, str]:
    """("v" or "epsilon", the reason) for an SD 2.x checkpoint (module docstring, step 3)."""
    kind = str(_metadata(path).get("modelspec.prediction_type", "")).strip().lower()
    if kind in ("v", "epsilon"):
        return kind, f"the file's metadata says modelspec.prediction_type={kind}"
    std = v_statistic(path)
    if std is None:
        return "v", "SD 2.x keys; no way to tell epsilon from v, so the 768-v config (pass --config otherwise)"
    kind = "v" if std > V_STATISTIC_THRESHOLD else "epsilon"
    sign = ">" if kind == "v" else "<="
    return kind, (f"std of output_blocks.11.1.transformer_blocks.0.norm1.bias = {std:.3f} {sign} "
                  f"{V_STATISTIC_THRESHOLD} (ComfyUI's rule)")


def choose_config(checkpoint: PathLike) -> ConfigChoice:
    """The config ``checkpoint`` needs (module docstring); raises SdgenError when its keys match no family."""
    path = Path(checkpoint)
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return ConfigChoice(beside.resolve(), f"{beside.name} beside the checkpoint")
    guess = guess_config(checkpoint_shapes(path))
    if guess is None:
        raise SdgenError(f"cannot tell which model {path.name} is from its keys: pass --config")
    reason = f"{NAMES.get(guess, guess)} keys"
    if guess == CONFIG_SD2V:
        kind, why = sd2_prediction(path)
        guess = CONFIG_SD2V if kind == "v" else CONFIG_SD2
        reason = f"{NAMES[guess]}: {why}"
    return ConfigChoice(bundled_config(guess), reason)


__all__ = ["ConfigChoice", "choose_config", "sd2_prediction", "v_statistic", "NAMES"]
