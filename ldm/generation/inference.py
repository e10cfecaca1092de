"""How a loaded model is prepared to run: weight dtype, memory format, optional compilation.

* ``--precision bf16``: the weights themselves become bfloat16 (UNet, text encoders), with bf16 autocast for
  the inputs; the VAE keeps float32 weights (its decode in bf16 shifts pixels visibly; it is a small share of
  the time). SDXL on CUDA with fp16 autocast gets float16 weights and a float32 VAE, as the originals upcast it.
* channels_last: on the CPU (oneDNN) and on CUDA the convolutions of the UNet and the VAE run faster with NHWC
  tensors (about 20 % on the CPU); the weights are converted once, and the UNet converts its input. Used for the
  reduced precisions only: in float32 NHWC kernels round differently in the last bits, and a float32 run
  keeps reproducing earlier images bit for bit.
* packed convolutions: on the CPU every convolution of the UNet and the VAE reorders its weight once for
  oneDNN instead of on every call (:mod:`ldm.modules.packed_conv`): a float32 UNet step at 512 px about 15 %
  faster, bf16 about 12 %; bf16 results are identical, float32 agree to about 1e-5 relative.
* ``--compile``: ``torch.compile`` of the UNet (the first step pays the compile time).
* ``--vae-tiling``: the VAE decodes in overlapping, blended tiles (:mod:`ldm.models.vae_tiling`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


def weights_dtype(kind: str, precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Weights dtype of a model of ``kind`` ("sd", "unclip", "sdxl") at load: bfloat16 for bf16 (any family),
    float16 for SDXL under CUDA fp16 autocast (halves memory; its VAE stays float32); None (float32) else: SD 1.x
    / 2.x keep float32 weights under autocast, as the originals do."""
    if precision == "bf16":
        return torch.bfloat16
    if kind == "sdxl" and device.type == "cuda" and precision in ("autocast", "fp16"):
        return torch.float16
    return None


def denoiser_and_text_modules(model: Any) -> list[torch.nn.Module]:
    """The modules whose weights ``--precision bf16`` converts: the UNet and the text encoders."""
    modules = [model.model]
    for name in ("cond_stage_model", "conditioner"):
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            modules.append(module)
    return modules


def convert_weights(model: Any, dtype: torch.dtype) -> None:
    """The parameters of the UNet and the text encoders to ``dtype`` (buffers such as schedules and position
    ids, and the VAE, keep theirs)."""
    for module in denoiser_and_text_modules(model):
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def use_channels_last(model: Any) -> None:
    """NHWC weights for the UNet and the VAE (convolutions pick NHWC kernels for NHWC weights)."""
    for module in (getattr(getattr(model, "model", None), "diffusion_model", None),
                   getattr(model, "first_stage_model", None)):
        if module is not None:
            module.to(memory_format=torch.channels_last)
            module.channels_last = True


def pack_model_convolutions(model: Any) -> int:
    """Packed convolutions (:mod:`ldm.modules.packed_conv`) in the UNet and the VAE; returns how many."""
    from ldm.modules.packed_conv import pack_convolutions

    count = 0
    for module in (getattr(getattr(model, "model", None), "diffusion_model", None),
                   getattr(model, "first_stage_model", None)):
        if isinstance(module, torch.nn.Module):
            count += pack_convolutions(module)
    return count


def compile_unet(model: Any) -> None:
    """``torch.compile`` the UNet's forward (compiled on its first call)."""
    unet = model.model.diffusion_model
    unet.forward = torch.compile(unet.forward, dynamic=False)


def reduced_precision(precision: str, device: torch.device) -> bool:
    """Whether a run computes in bf16 / fp16 (fp32 runs keep the contiguous layout: NHWC kernels change float32
    results in the last bits, and a float32 run reproduces earlier images bit for bit)."""
    return precision in ("bf16", "fp16") or (precision == "autocast" and device.type == "cuda")


#: UNet step fp32 / bf16 on the full-size SD 1.x model with packed convolutions, CPU with AMX, 2 threads
#: (scripts/benchmark_diffusers.py: 11.7 s / 6.6 s, and 12.29 s / 4.64 s; an in-process A/B: 12.05 s / 4.56 s).
BF16_SPEEDUP = 2.0


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16; Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def precision_hint(precision: str, device: torch.device) -> Optional[str]:
    """One line for the run header when a float32 CPU run could use the CPU's native bfloat16."""
    if device.type != "cpu" or precision not in ("autocast", "full") or not cpu_has_native_bf16():
        return None
    return (f"this CPU computes bfloat16 natively: --precision bf16 runs about {BF16_SPEEDUP:.0f}x faster "
            "(float32 stays the default for fidelity)")


def prepare_for_inference(model: Any, precision: str, device: torch.device, *, channels_last: bool = True,
                          compile: bool = False, vae_tiling: bool = False, pack: bool = True,
                          engine: str = "torch") -> Any:
    """``model`` converted for a run at ``precision`` on ``device`` (see the module docstring); returns it.
    ``pack``: packed convolutions on the CPU (they pack on their first call, after LoRA merges). With another
    ``engine`` (:mod:`ldm.engines`) the weights stay float32 and plain: that engine converts them itself."""
    if engine != "torch":
        if vae_tiling:
            from ldm.models.vae_tiling import Tiling

            model.first_stage_model.tiling = Tiling()
        return model
    kind = "sdxl" if hasattr(model, "conditioner") else "sd"
    dtype = weights_dtype(kind, precision, device)
    if dtype is not None:
        convert_weights(model, dtype)
    if channels_last and reduced_precision(precision, device) and device.type in ("cpu", "cuda"):
        use_channels_last(model)
    if pack and device.type == "cpu" and not compile:
        pack_model_convolutions(model)
    if compile:
        compile_unet(model)
    if vae_tiling:
        from ldm.models.vae_tiling import Tiling

        model.first_stage_model.tiling = Tiling()
    return model


__all__ = ["weights_dtype", "prepare_for_inference", "use_channels_last", "compile_unet", "precision_hint",
           "pack_model_convolutions"]
