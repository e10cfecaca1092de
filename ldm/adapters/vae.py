"""``--vae PATH``: another autoencoder in place of the checkpoint's first stage.

Released VAE files (e.g. ``vae-ft-mse-840000-ema-pruned.ckpt``, the SDXL VAE) hold the original layout's keys
(``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``), some with the ``first_stage_model.``
prefix of a full checkpoint; training leftovers (``loss.*``: the discriminator and LPIPS, ``model_ema.*``) are
dropped. The keys and shapes must be exactly the model's first stage's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ldm.errors import SdgenError

PREFIX = "first_stage_model."
_DROPPED = ("loss.", "model_ema.")


def read_vae(path: str | Path) -> dict[str, torch.Tensor]:
    """The autoencoder weights of a VAE file, keyed as the first stage's own state_dict."""
    from ldm.checkpoint_reader import read_state_dict

    tensors = read_state_dict(path, "VAE file")
    if any(k.startswith(PREFIX) for k in tensors):
        tensors = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    return {k: v for k, v in tensors.items() if not k.startswith(_DROPPED)}


def check_vae(path: str | Path, tensors: Mapping[str, torch.Tensor], first_stage: nn.Module) -> None:
    """Raise SdgenError unless ``tensors`` has exactly ``first_stage``'s keys and shapes (how many differ, the
    first)."""
    want = {k: tuple(v.shape) for k, v in first_stage.state_dict().items()}
    missing = [k for k in want if k not in tensors]
    extra = [k for k in tensors if k not in want]
    wrong = [k for k in want if k in tensors and tuple(tensors[k].shape) != want[k]]
    name = Path(path).name
    if missing or extra:
        first = (missing or extra)[0]
        raise SdgenError(f"the VAE file {name} does not fit this model: {len(missing)} keys missing, {len(extra)} "
                         f"unknown (first: {first}); it needs the original autoencoder layout (encoder.*, decoder.*)")
    if wrong:
        k = wrong[0]
        raise SdgenError(f"the VAE file {name} does not fit this model: {len(wrong)} tensors have other shapes (first: "
                         f"{k} {list(tensors[k].shape)} for {list(want[k])})")


@torch.no_grad()
def replace_vae(first_stage: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``first_stage`` (each converted to the weight's device and dtype)."""
    own = first_stage.state_dict()
    for key, value in tensors.items():
        own[key].copy_(value.to(device=own[key].device, dtype=own[key].dtype))


__all__ = ["read_vae", "check_vae", "replace_vae"]
