"""``--engine openvino``: the UNet, the VAE and the text towers run as OpenVINO models on the CPU (optional
``openvino`` extra).

Each network is converted once from its torch module (after LoRA merges, a ``--vae`` swap and everything else that
changes weights; a text encoder's tower: every hidden state, :mod:`ldm.modules.encoders.text_towers`) with
``openvino.convert_model`` (the plain modules: packed convolutions cannot be converted), saved
as IR with dynamic shapes in a cache folder, and compiled for the CPU once per input shape (static shapes). The
torch module is released after conversion (or not converted at all on a cache hit).

- Cache: ``$SDGEN_OPENVINO_CACHE``, else ``<sdgen cache>/openvino`` (``$SDGEN_CACHE_DIR`` / ``~/.cache/sdgen``). An
  entry's key is a hash of what decides the network: the checkpoint's and adapters' sha256 (LoRA files and scales,
  embeddings, VAE), the network's role, the inference precision, the OpenVINO version and :data:`IR_FORMAT`. The IR
  is shape-agnostic, so shapes are not part of the key. Entries are written to a temporary folder and renamed
  into place (several processes may race; one rename wins); an entry records the size and sha256 of its weights
  file, and one that does not match (truncated, corrupt) is removed and rebuilt.
- Precision: ``full`` (and ``autocast``, float32 on the CPU) compile with ``INFERENCE_PRECISION_HINT=f32``;
  ``bf16`` with ``bf16`` where the CPU has it (AVX-512 BF16 or AMX); other choices are one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

IR_FORMAT = 1  # bump when the conversion changes what an entry holds
EXTRA_HINT = 'pip install "sdgen[openvino]"'


def require_openvino() -> Any:
    """The ``openvino`` module, or a one-line error naming the extra."""
    try:
        import openvino
    except ImportError:
        raise SdgenError(f"--engine openvino needs the openvino extra: {EXTRA_HINT}") from None
    return openvino


def openvino_version() -> str:
    """The installed OpenVINO release, e.g. "2026.4.1"."""
    return str(require_openvino().__version__).split("-")[0]


def cpu_capabilities() -> set[str]:
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (e.g. FP32, BF16, INT8)."""
    ov = require_openvino()
    return {str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def inference_precision(precision: str) -> str:
    """OpenVINO's inference precision hint for sdgen's ``--precision`` on this CPU (SdgenError where it has none)."""
    if precision in ("full", "autocast"):
        return "f32"
    capabilities = cpu_capabilities()
    if precision == "bf16":
        if "BF16" in capabilities:
            return "bf16"
        raise SdgenError("--precision bf16 with --engine openvino needs a CPU that computes bfloat16 (AVX-512 BF16 "
                         f"or AMX); this one offers {', '.join(sorted(capabilities))}: use --precision full")
    raise SdgenError(f"--engine openvino runs --precision full or bf16 on the CPU, not {precision}")


def cache_root() -> Path:
    """Where converted networks are kept (module docstring)."""
    if os.environ.get("SDGEN_OPENVINO_CACHE"):
        return Path(os.environ["SDGEN_OPENVINO_CACHE"]).expanduser()
    from ldm.model_files import default_cache_dir

    return default_cache_dir() / "openvino"


def entry_key(parts: Sequence[str], role: str, hint: str) -> str:
    """The cache key of one network: a hash of the weights' identity, its role, the precision and the versions."""
    record = {"weights": list(parts), "role": role, "precision": hint, "openvino": openvino_version(),
              "format": IR_FORMAT}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry_ok(folder: Path) -> bool:
    """Whether a cache entry is whole: its manifest, IR and weights, the weights of the recorded size and hash."""
    try:
        meta = json.loads((folder / "entry.json").read_text())
        weights = folder / "model.bin"
        return ((folder / "model.xml").is_file() and weights.stat().st_size == meta["bin_size"]
                and _sha256(weights) == meta["bin_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cached_entry(key: str, notify: Optional[Callable[[str], None]] = None) -> Any:
    """The OpenVINO model of cache entry ``key`` when it is whole (its weights hashed once), else None; an
    incomplete or corrupt entry is removed (and ``notify`` told) so that it is converted again."""
    folder = cache_root() / key
    if not folder.exists():
        return None
    if _entry_ok(folder):
        logger.info("openvino: reusing the converted network %s", folder)
        return require_openvino().Core().read_model(str(folder / "model.xml"))
    (notify or logger.warning)(f"openvino: cache entry {folder} is incomplete or corrupt; converting again")
    shutil.rmtree(folder, ignore_errors=True)
    return None


def cached_model(key: str, convert: Callable[[], Any], notify: Optional[Callable[[str], None]] = None) -> Any:
    """The OpenVINO model of cache entry ``key``: read when whole, else made by ``convert()`` and saved atomically."""
    ov = require_openvino()
    found = cached_entry(key, notify)
    if found is not None:
        return found
    folder = cache_root() / key
    model = convert()
    tmp = cache_root() / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        weights = tmp / "model.bin"
        (tmp / "entry.json").write_text(json.dumps({"bin_size": weights.stat().st_size, "bin_sha256": _sha256(weights),
                                                    "openvino": openvino_version(), "format": IR_FORMAT}))
        try:
            os.replace(tmp, folder)
            ours = True
        except OSError:  # another process renamed its copy first: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
            ours = False
        if ours or _entry_ok(folder):  # the saved copy, its weights memory-mapped: the converted one can be freed
            del model
            return ov.Core().read_model(str(folder / "model.xml"))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("openvino: could not save the converted network in %s (%s); it is used unsaved", folder, exc)
    return model


class OpenVINONetwork(nn.Module):
    """An OpenVINO model standing in for a torch module: compiled for each input shape on first use; float32
    (int64 for class labels) in, float32 torch tensors out.

    Args:
        model: the ``openvino.Model`` (dynamic shapes), or None while it is made on the first call from
            ``convert(example_inputs)``.
        hint: the inference precision hint ("f32" / "bf16").
    """

    def __init__(self, model: Any, hint: str, convert: Optional[Callable[[Sequence[torch.Tensor]], Any]] = None) -> None:
        super().__init__()
        self._model, self._hint, self._convert = model, hint, convert
        self._compiled: dict[tuple, Any] = {}

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for ``inputs`` (each a torch tensor; float inputs are given as float32)."""
        arrays = [t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64).contiguous()
                  for t in inputs]
        if self._model is None:
            self._model = self._convert(arrays)
            self._convert = None  # releases the torch module
        key = tuple((tuple(a.shape), str(a.dtype)) for a in arrays)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile([tuple(a.shape) for a in arrays])
            self._compiled[key] = compiled
        out = compiled([a.numpy() for a in arrays])[compiled.output(0)]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def _compile(self, shapes: list[tuple[int, ...]]) -> Any:
        ov = require_openvino()
        model = self._model.clone()
        model.reshape({port.get_any_name(): ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
        config = {"INFERENCE_PRECISION_HINT": self._hint, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads())}
        return ov.Core().compile_model(model, "CPU", config)


class UNetInputs(nn.Module):
    """The UNet as a function of plain tensors (what is converted): x, float32 timesteps, context and, for models
    with a class / ADM input, y."""

    def __init__(self, unet: nn.Module, with_y: bool) -> None:
        super().__init__()
        self.unet, self.with_y = unet, with_y

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context=context, y=y[0] if self.with_y else None)


class OpenVINOUNet(nn.Module):
    """``UNetModel.forward(x, timesteps, context, y)`` through OpenVINO (the signature the denoisers call)."""

    def __init__(self, network: OpenVINONetwork, with_y: bool) -> None:
        super().__init__()
        self.network, self.with_y = network, with_y
        # an empty float32 parameter: what the model asks of its UNet's device and dtype (ldm.models...device)
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Any = None,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(context, (list, tuple)):
            raise SdgenError("--engine openvino: a UNet with one context per transformer block is not supported")
        t = torch.as_tensor(timesteps).reshape(-1).to(torch.float32).expand(x.shape[0])
        inputs = [x, t, context] + ([y] if self.with_y else [])
        return self.network.run(*inputs).to(x.dtype)


class Chain(nn.Module):
    """``second(first(x))``: a VAE half with its 1x1 (post-)quantisation convolution, converted as one network."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class OpenVINOModule(nn.Module):
    """A one-input network through OpenVINO, returning the input's dtype."""

    def __init__(self, network: OpenVINONetwork) -> None:
        super().__init__()
        self.network = network
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.run(x).to(x.dtype)


def return_freed_memory() -> None:
    """Give the memory of freed torch weights back to the system: most of a network's tensors are small enough
    for glibc to keep in its heap once freed (measured: 3 GB of the SD 1.x UNet's 3.4 GB stayed resident), where
    it would add to the compiled network's own copy (the SD 1.x UNet's conversion peak: 10.0 -> 8.2 GB)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class OpenVINOTower:
    """A text encoder's ``tower_states(ids)`` through OpenVINO (ids int64 (N, L) -> states (n + 1, N, L, D)).
    Not a module: set on the encoder instance, it stands in for the method."""

    def __init__(self, network: OpenVINONetwork) -> None:
        self.network = network

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.network.run(ids)


def _network(module: nn.Module, key: str, hint: str, notify: Optional[Callable[[str], None]],
             release: Optional[Callable[[], None]] = None) -> OpenVINONetwork:
    """The OpenVINO network of ``module``: from the cache now, or converted on its first call. ``release`` drops
    the torch weights the network replaces (at once on a cache hit, else after the conversion)."""
    ov = require_openvino()
    found = cached_entry(key, notify)
    if found is not None:
        if release is not None:
            release()
        return OpenVINONetwork(found, hint)
    holder = {"module": module.float().eval().requires_grad_(False), "release": release}

    def convert(example: Sequence[torch.Tensor]) -> Any:
        torch_module = holder.pop("module")
        release_torch = holder.pop("release")
        logger.info("openvino: converting %s (once; cached as %s)", type(torch_module).__name__, key)

        def trace_and_convert() -> Any:
            # traced here without torch's trace check (a second forward pass and comparison: a third of the
            # conversion time). Traced as a module, the converted model shares the torch weights' memory until it
            # is saved (traced as a function, every weight became a copied constant: over 20 GB for the SD 1.x
            # UNet). The example's shapes do not stay fixed in the converted model.
            traced = torch.jit.trace(torch_module, tuple(example), check_trace=False, strict=False)
            return ov.convert_model(traced, example_input=tuple(example))

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
            converted = cached_model(key, trace_and_convert, notify)
        del torch_module
        if release_torch is not None:
            release_torch()
        return_freed_memory()
        return converted

    return OpenVINONetwork(None, hint, convert)


def _unet_has_y(unet: nn.Module) -> bool:
    return getattr(unet, "num_classes", None) is not None


def apply_openvino(model: Any, precision: str, key: Sequence[str], notify: Optional[Callable[[str], None]] = None
                   ) -> Any:
    """Replace ``model``'s UNet, VAE halves and text towers by OpenVINO networks (module docstring); returns
    ``model``."""
    from ldm.modules.encoders.modules import TextEncoder

    hint = inference_precision(precision)
    parts = list(key)
    encoders = [m for m in model.modules() if isinstance(m, TextEncoder)] if isinstance(model, nn.Module) else []
    for index, encoder in enumerate(encoders):
        network = _network(encoder.tower(), entry_key(parts, f"text-tower-{index}", hint), hint, notify,
                           release=encoder.release_tower)
        encoder.tower_states = OpenVINOTower(network)  # an instance attribute: shadows the method
    wrapper = getattr(model, "model", None)
    unet = getattr(wrapper, "diffusion_model", None)
    if unet is not None:
        with_y = _unet_has_y(unet)
        network = _network(UNetInputs(unet, with_y), entry_key(parts, "unet", hint), hint, notify)
        wrapper.diffusion_model = OpenVINOUNet(network, with_y)
    vae = getattr(model, "first_stage_model", None)
    if vae is not None and hasattr(vae, "decoder"):
        decoder = _network(Chain(vae.post_quant_conv, vae.decoder), entry_key(parts, "vae-decoder", hint), hint, notify)
        encoder = _network(Chain(vae.encoder, vae.quant_conv), entry_key(parts, "vae-encoder", hint), hint, notify)
        vae.decoder, vae.post_quant_conv = OpenVINOModule(decoder), nn.Identity()
        vae.encoder, vae.quant_conv = OpenVINOModule(encoder), nn.Identity()
    return_freed_memory()  # the networks found in the cache: their torch weights are gone now
    return model


__all__ = ["apply_openvino", "cache_root", "cached_entry", "cached_model", "entry_key", "inference_precision",
           "openvino_version", "require_openvino", "OpenVINONetwork"]
