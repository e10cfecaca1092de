"""``--offload``: the weights live in host memory and each part of a model moves to the GPU only while it runs.

The parts are a model's top-level modules (text encoder / conditioner, the UNet wrapper, the VAE, the unCLIP
image tower ...). A forward pre-hook on every module inside a part makes that part resident before the call: the
part that was resident goes back to the host first, so at most one part holds GPU memory (its activations
aside). A part keeps its place while it is called again (the UNet through all the steps of a batch), so the
copies happen a few times per batch: text encoder -> UNet -> VAE. The model's own small tensors (noise
schedules) move to the GPU once, and ``model.device`` names the GPU, so the sampling loop makes its tensors
there. The same policy as diffusers' ``enable_model_cpu_offload``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

Mover = Callable[[nn.Module, torch.device], None]


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)


class ModelOffload:
    """One model's parts moved on demand between ``home`` (host memory) and ``device`` (see the module doc).

    ``move`` is how a part moves (``module.to(device)``; tests record the calls)."""

    def __init__(self, model: nn.Module, device: torch.device, home: torch.device = torch.device("cpu"),
                 move: Optional[Mover] = None) -> None:
        self.device, self.home = torch.device(device), torch.device(home)
        self.move = move or _move
        self.parts: list[nn.Module] = [child for _, child in model.named_children()
                                       if any(True for _ in child.parameters())]
        self.resident: Optional[nn.Module] = None
        self._model = model
        self._handles = []
        for part in self.parts:
            self.move(part, self.home)
            for module in part.modules():
                self._handles.append(module.register_forward_pre_hook(
                    lambda module, args, part=part: self.make_resident(part)))
        for param in model.parameters(recurse=False):
            param.data = param.data.to(self.device)
        for name, buffer in list(model._buffers.items()):
            if buffer is not None:
                model._buffers[name] = buffer.to(self.device)

    def make_resident(self, part: nn.Module) -> None:
        """``part`` on the GPU, the part there before back home."""
        if self.resident is part:
            return
        if self.resident is not None:
            self.move(self.resident, self.home)
        self.move(part, self.device)
        self.resident = part

    def release(self) -> None:
        """Everything back home, the hooks removed, and ``model.device`` that of its weights again."""
        if self.resident is not None:
            self.move(self.resident, self.home)
            self.resident = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self._model, "offload", None) is self:
            del self._model.offload


def offload_model(model: Any, device: torch.device, move: Optional[Mover] = None) -> ModelOffload:
    """Offload ``model`` (loaded in host memory) to ``device``: sets ``model.offload``; returns it."""
    offload = ModelOffload(model, device, move=move)
    model.offload = offload
    return offload


__all__ = ["ModelOffload", "offload_model"]
