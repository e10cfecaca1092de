"""What every generation command does to its decoded images: the safety checker and the invisible watermark.

As the CompVis scripts (CV ``scripts/txt2img.py``): the checker runs on the decoded [0, 1] images and flagged
ones become black (:func:`ldm.generation.generate.generate` takes the checker); the watermark is embedded into each saved
image, after the checker, and into the grid. :class:`OutputSafety` holds a run's choice of both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldm.safety.checker import SafetyChecker, png_settings, resolve_safety_checker
from ldm.safety.watermark import Message, apply_watermark, message_for_config


@dataclass
class OutputSafety:
    """A run's safety checker (None: none runs) and watermark message (None: no watermark)."""

    checker: Optional[SafetyChecker] = None
    checker_path: Optional[str] = None
    message: Optional[Message] = None

    @classmethod
    def resolve(
        cls,
        checker_path: str | Path | None,
        *,
        disabled: bool = False,
        watermark: bool = True,
        model_config: Any = None,
        device: str | torch.device = "cpu",
    ) -> "OutputSafety":
        """From the flags: ``--safety-checker PATH`` (else the model config's ``safety_checker`` entry),
        ``--no-safety-checker`` (``disabled``), ``--no-watermark`` (``watermark=False``). The watermark message
        is the original scripts' one for the config's model family. Loads the checker (fails early on a bad file).
        """
        checker = resolve_safety_checker(checker_path, disabled=disabled, model_config=model_config, device=device)
        path = None
        if checker is not None:
            path = checker_path
            if path is None:
                entry = model_config.get("safety_checker", None)
                path = entry if isinstance(entry, (str, Path)) else entry.get("path", None)
        message = message_for_config(model_config) if watermark else None
        return cls(checker, str(path) if path is not None else None, message)

    def png_settings(self, flagged: Optional[bool]) -> dict[str, str]:
        """The ``Safety checker`` entry of an image's PNG parameters (none when no checker runs)."""
        return png_settings(flagged if self.checker is not None else None)

    def mark(self, pixels: np.ndarray) -> np.ndarray:
        """The watermark on an (H, W, 3) uint8 image (unchanged without a message)."""
        return pixels if self.message is None else apply_watermark(pixels, self.message)

    def manifest(self) -> dict[str, Any]:
        """For the run manifest: the checker file and the watermark message (text, or the bits as 0/1)."""
        if self.message is None:
            label = None
        elif isinstance(self.message, (bytes, bytearray)):
            label = bytes(self.message).decode("utf-8")
        else:
            label = "".join(str(int(b)) for b in self.message)
        return {"checker": self.checker_path, "watermark": label}
