"""The invisible watermark the reference scripts embed in every output (``invisible-watermark``, dwtDct).

The originals mark each saved image with a fixed message: SD 1.x ``b"StableDiffusionV1"`` (CompVis
``scripts/txt2img.py::put_watermark``), SD 2.x ``b"SDV2"`` (Stability-AI/stablediffusion ``scripts/txt2img.py``),
SDXL a fixed 48-bit pattern (generative-models ``sgm/inference/helpers.py``, ``WATERMARK_MESSAGE``). All use the
'dwtDct' method on the BGR channel order. The library is an optional dependency (the ``watermark`` extra);
without it, images are saved unmarked and the run says so once.

dwtDct needs at least 256 x 256 pixels (h * w); smaller images are left unmarked. It marks the largest
non-DC coefficient of each 4x4 block of the U channel's wavelet approximation, so reading a mark back depends
on the content: pictures with flat regions and edges decode reliably, long smooth gradients or noise can lose
bits after uint8 rounding (a property of the library's method, not of this wrapper).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

SD1_MESSAGE = b"StableDiffusionV1"
SD2_MESSAGE = b"SDV2"
# SGM helpers.py: 0b101100111110110010010000011110111011000110011110 ("chosen at random"), 48 bits
SDXL_MESSAGE_INT = 0xB3EC907BB19E
SDXL_BITS: tuple[int, ...] = tuple(int(b) for b in format(SDXL_MESSAGE_INT, "048b"))
METHOD = "dwtDct"
MIN_PIXELS = 256 * 256

Message = Union[bytes, Sequence[int]]

_FAMILY_MESSAGES: dict[str, Message] = {
    "sd1": SD1_MESSAGE,
    "sld": SD1_MESSAGE,
    "sd2": SD2_MESSAGE,
    "unclip": SD2_MESSAGE,
    "sdxl": SDXL_BITS,
}

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def watermark_available() -> bool:
    """Whether the ``invisible-watermark`` package (``imwatermark``) can be imported."""
    try:
        import imwatermark  # noqa: F401
    except ImportError:
        return False
    return True


def message_for_family(family: str) -> Message:
    """The original scripts' message for a model family: sd1 (and sld), sd2 (and unclip), sdxl."""
    try:
        return _FAMILY_MESSAGES[family.lower()]
    except KeyError:
        raise SdgenError(
            f"no watermark message for model family {family!r} (known: {', '.join(_FAMILY_MESSAGES)})"
        ) from None


def _mode(message: Message) -> tuple[str, Message]:
    if isinstance(message, (bytes, bytearray)):
        return "bytes", bytes(message)
    bits = [int(b) for b in message]
    if any(b not in (0, 1) for b in bits):
        raise ValueError("a bit message must hold only 0 and 1")
    return "bits", bits


def message_length_bits(message: Message) -> int:
    """Length of ``message`` in bits (8 per byte)."""
    mode, value = _mode(message)
    return 8 * len(value) if mode == "bytes" else len(value)


def apply_watermark(image: Image.Image | np.ndarray, message: Message = SD1_MESSAGE) -> Image.Image | np.ndarray:
    """Embed ``message`` (bytes, or a sequence of 0/1 bits) with dwtDct; returns a new image of the same kind.

    ``image``: a PIL image or an (H, W, 3) uint8 RGB array. As the originals: RGB -> BGR uint8,
    ``WatermarkEncoder.encode(img, 'dwtDct')``, back to RGB. Images under 256 x 256 pixels, or a missing
    library, are returned unchanged (said once per process).
    """
    is_array = isinstance(image, np.ndarray)
    height, width = image.shape[:2] if is_array else (image.height, image.width)
    if width * height < MIN_PIXELS:
        _warn_once("small", "images smaller than 256x256 pixels are not watermarked (%dx%d)", width, height)
        return image
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        _warn_once(
            "missing",
            "invisible-watermark is not installed: outputs are not watermarked (pip install 'sdgen[watermark]')",
        )
        return image
    mode, value = _mode(message)
    encoder = WatermarkEncoder()
    encoder.set_watermark(mode, value)
    rgb = np.asarray(image, dtype=np.uint8) if is_array else np.asarray(image.convert("RGB"))
    marked = encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), METHOD)
    out = np.ascontiguousarray(marked[:, :, ::-1])
    return out if is_array else Image.fromarray(out)


def read_watermark(image: Image.Image, message_like: Message | int = SD1_MESSAGE) -> Message:
    """Decode a dwtDct watermark from an RGB image.

    ``message_like``: the expected message (its kind and length are used) or a length in bits (read as
    bytes). Returns bytes, or a list of bits for a bit message. Needs the ``invisible-watermark`` package.
    """
    try:
        from imwatermark import WatermarkDecoder
    except ImportError as exc:
        raise SdgenError("reading watermarks needs the invisible-watermark package (sdgen[watermark])") from exc
    if isinstance(message_like, int):
        mode, length = "bytes", message_like
    else:
        mode = _mode(message_like)[0]
        length = message_length_bits(message_like)
    decoder = WatermarkDecoder(mode, length)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    decoded = decoder.decode(bgr, METHOD)
    if mode == "bits":
        return [int(b) for b in decoded]
    return bytes(decoded)


def family_of_config(config: Any) -> str:
    """The model family a config describes, for the watermark message: sdxl, sd2 (OpenCLIP text) or sd1."""
    try:
        model = config["model"]
        params = model.get("params", None) or {}
    except (KeyError, TypeError):
        return "sd1"
    if "conditioner_config" in params or str(model.get("target", "")).endswith("DiffusionEngine"):
        return "sdxl"
    cond_target = str((params.get("cond_stage_config", None) or {}).get("target", ""))
    return "sd2" if "OpenCLIP" in cond_target else "sd1"


def message_for_config(config: Any) -> Message | None:
    """The original scripts' watermark message for a model config (see :func:`family_of_config`); None when the
    config says ``watermark: false`` (the bundled demo model: 64x64 images are too small to carry the mark)."""
    if hasattr(config, "get") and config.get("watermark", True) is False:
        return None
    return message_for_family(family_of_config(config))
