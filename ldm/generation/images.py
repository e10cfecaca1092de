"""Images in and out of a run: init images read and resized as the originals do, decoded latents to uint8."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ldm.errors import SdgenError

if TYPE_CHECKING:
    import PIL.Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path: str | os.PathLike, what: str = "init image") -> "PIL.Image.Image":
    """Open an image file as RGB, refusing a truncated or damaged one instead of decoding part of it.

    The file is checked whole first (PIL ``verify``: every PNG chunk's CRC up to IEND; a JPEG must reach its
    end-of-image marker), then decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from ldm.files import looks_like, require_file

    p = require_file(path, what)
    try:
        with Image.open(p) as handle:
            kind = handle.format
            handle.verify()
        if kind == "JPEG" and p.read_bytes().rfind(b"\xff\xd9") < 2:
            raise SdgenError(f"the {what} {path} is a truncated JPEG (no end-of-image marker)")
        with Image.open(p) as handle:
            return handle.convert("RGB")
    except UnidentifiedImageError as exc:
        raise SdgenError(f"the {what} {path} is not an image (it looks like {looks_like(p)})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).split("\n")[0] or type(exc).__name__
        raise SdgenError(f"the {what} {path} is truncated or damaged ({reason})") from exc


def image_paths(path: Optional[str], command: str = "unclip-variate") -> list[Path]:
    """The init images of ``--init-img``: the file itself, or the image files of a folder (sorted by name)."""
    if not path:
        raise SdgenError(f"{command} needs an input image: pass --init-img PATH (an image or a folder of images)")
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SdgenError(f"the folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return found
    if not p.is_file():
        raise SdgenError(f"init image not found: {p}")
    return [p]


def image_to_tensor(image: "PIL.Image.Image", size: Optional[tuple[int, int]], multiple: int) -> torch.Tensor:
    """An RGB image as (3, H, W) float32 in [-1, 1] (CV scripts/img2img.py ``load_img``).

    ``size`` = (width, height) to resize to; None keeps the image's size rounded down to ``multiple`` (the
    original rounds to 32 for f=8). Lanczos resampling as in the original.
    """
    from PIL import Image

    w, h = size if size is not None else (image.width - image.width % multiple, image.height - image.height % multiple)
    if w <= 0 or h <= 0:
        raise SdgenError(f"the init image ({image.width}x{image.height}) is smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def fit_init_image(image: "PIL.Image.Image", height: Optional[int], width: Optional[int], multiple: int) -> torch.Tensor:
    """An init image (PIL, RGB) as (3, H, W) in [-1, 1]: resized to ``height`` x ``width`` where given (a missing
    side keeps the image's, rounded down to ``multiple``), else its own size rounded down (CV scripts/img2img.py)."""
    size = None
    if height is not None or width is not None:
        size = (width or image.width - image.width % multiple, height or image.height - image.height % multiple)
    return image_to_tensor(image, size, multiple)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) in [-1, 1] -> float32 in [0, 1] (clamped)."""
    return torch.clamp((images.float() + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 by truncation (CV txt2img: ``(255 * x).astype(uint8)``)."""
    return (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)
