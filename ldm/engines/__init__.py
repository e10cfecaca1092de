"""How the networks of a loaded model execute: ``torch`` (eager PyTorch, with the packing and layout of
:mod:`ldm.generation.inference`) or ``openvino`` (:mod:`ldm.engines.ov_engine`: each network converted once to an
OpenVINO model, cached on disk by content, compiled for the CPU). An engine replaces modules by callables with the
torch modules' signatures, so the denoiser, samplers, guidance and conditioners never know which engine runs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ldm.errors import SdgenError

ENGINES = ("torch", "openvino")


def check_engine(engine: str, precision: str, device_type: str, *, compile: bool = False,
                 offload: bool = False) -> None:
    """Refuse engine choices that cannot run (SdgenError, one line) before any model is loaded."""
    if engine not in ENGINES:
        raise SdgenError(f"unknown --engine {engine!r} ({', '.join(ENGINES)})")
    if engine == "torch":
        return
    from ldm.engines.ov_engine import inference_precision, require_openvino

    require_openvino()
    if device_type != "cpu":
        raise SdgenError(f"--engine openvino runs on the CPU; this run is on {device_type} (use --device cpu)")
    if compile or offload:
        raise SdgenError("--engine openvino compiles the networks itself: leave out --compile and --offload")
    inference_precision(precision)


def apply_engine(model: Any, engine: str, precision: str, key: Sequence[str], notify: Optional[Any] = None) -> Any:
    """Run ``model``'s networks with ``engine`` (a no-op for torch); ``key`` names the weights (checkpoint and
    adapter hashes) for the on-disk cache of converted networks. Returns ``model``."""
    if engine == "torch":
        return model
    from ldm.engines.ov_engine import apply_openvino

    return apply_openvino(model, precision, key, notify=notify)


def engine_record(engine: str) -> dict[str, Optional[str]]:
    """What the manifest and the PNG parameters record of the engine: its name and version."""
    if engine == "torch":
        import torch

        return {"engine": "torch", "engine_version": torch.__version__}
    from ldm.engines.ov_engine import openvino_version

    return {"engine": "openvino", "engine_version": openvino_version()}


__all__ = ["ENGINES", "apply_engine", "check_engine", "engine_record"]
