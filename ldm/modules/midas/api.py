"""The depth model of Stable Diffusion 2 depth-to-image as the diffusion model holds it (``depth_model``).

SAI2 (Stability-AI/stablediffusion cf1d67a) ``ldm/modules/midas/api.py``: ``MiDaSInference`` wraps the MiDaS
network as ``self.model``, so the released ``512-depth-ema.ckpt`` names its 368 weights
``depth_model.model.pretrained.*`` and ``depth_model.model.scratch.*``. Unlike the original (which also reads
``midas_models/dpt_hybrid-midas-501f0c75.pt`` in its constructor, api.py l.14-19 and l.150-155), this class
loads no file: the checkpoint carries the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SdgenError
from ldm.modules.midas.dpt import DPTDepthModel

#: the model types this port builds (the original also knows dpt_large, midas_v21 and midas_v21_small, which no
#: released Stable Diffusion file uses; v2-midas-inference.yaml asks for dpt_hybrid)
MODEL_TYPES = ("dpt_hybrid",)
#: the network's input sides must be multiples of this (two stride-2 steps below the 16-pixel token grid)
INPUT_MULTIPLE = 32


class MiDaSInference(nn.Module):
    """MiDaS depth estimation for depth-to-image conditioning.

    Args:
        model_type: only ``"dpt_hybrid"`` (anything else raises :class:`SdgenError`).

    Built with random init on the current default device (the loader builds it on the meta device and assigns
    the checkpoint's tensors); has parameters only, no buffers. Always in eval mode (no dropout or batch norm
    exists, so the mode changes nothing).
    """

    def __init__(self, model_type: str = "dpt_hybrid") -> None:
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise SdgenError(f"unknown MiDaS model type {model_type!r}: only {', '.join(MODEL_TYPES)} is supported "
                             "(the depth model of 512-depth-ema.ckpt)")
        self.model_type = model_type
        self.model = DPTDepthModel()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth of a normalised MiDaS input (:func:`ldm.modules.midas.transforms.midas_input`).

        Args:
            x: (B, 3, H', W'), values (image in [0, 1] - 0.5) / 0.5, H' and W' multiples of 32.
        Returns:
            (B, 1, H', W') >= 0, unitless (larger = nearer). As SAI2 api.py l.157-169: the network under
            ``no_grad``, then a bicubic (align_corners False) resize to the input size, an identity here.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise SdgenError(f"MiDaS expects a (B, 3, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[2] % INPUT_MULTIPLE or x.shape[3] % INPUT_MULTIPLE:
            raise SdgenError(f"MiDaS input sides must be multiples of {INPUT_MULTIPLE}, got "
                             f"{x.shape[2]}x{x.shape[3]} (use midas_input to resize)")
        with torch.no_grad():
            prediction = self.model(x)
        prediction = F.interpolate(prediction.unsqueeze(1), size=x.shape[2:], mode="bicubic", align_corners=False)
        return prediction
