"""A run's input images: read once, checked, and held at the size each job uses (:class:`InitImages`).

An input is a (C, H, W) float32 tensor whose first three channels are the RGB image in [-1, 1]; inpainting adds
its mask as a 4th channel (1 = repaint, SAI2 ``make_batch_sd``: greyscale >= 0.5), ``depth2img --depth-map`` its
depth image (in [0, 1], larger = nearer). The x4 upscaler's input is the low-res image, a quarter of the output size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldm.errors import SdgenError
from ldm.generation import images as image_io
from ldm.model_files import file_sha256


@dataclass(frozen=True)
class InitImage:
    """An input image: its file, sha256 and pixels (C, H, W) at the size the run uses (RGB in [-1, 1], then an
    inpainting mask or a depth map when ``extra_path`` is set, with its sha256)."""

    path: Path
    sha256: str
    tensor: torch.Tensor
    extra_path: Optional[Path] = None
    extra_sha256: Optional[str] = None

    @property
    def key_sha256(self) -> str:
        """What decides the pixels: the image's sha256, and the mask's or depth map's."""
        return self.sha256 if self.extra_sha256 is None else f"{self.sha256}+{self.extra_sha256}"


def read_grey(path: str | Path, what: str) -> np.ndarray:
    """A greyscale image (mask, depth map) as float32 (H, W) in [0, 1]: 8-bit luma / 255 (PIL ``convert("L")``, as
    the inpainting scripts read masks), 16-bit / 65535."""
    from PIL import Image

    image_io.read_image(path, what)  # the same checks (missing, empty, truncated, not an image)
    with Image.open(Path(path).expanduser()) as handle:
        if handle.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(handle, dtype=np.float64)
            top = 65535.0 if handle.mode.startswith("I;16") or array.max() > 255 else 255.0
            return (array / top).astype(np.float32)
        return np.asarray(handle.convert("L"), dtype=np.float32) / 255.0


def resize_grey(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) float32 -> (height, width) with PIL's Lanczos filter (the image's own resampling)."""
    from PIL import Image

    if array.shape == (height, width):
        return array
    return np.asarray(Image.fromarray(array, mode="F").resize((width, height), resample=Image.LANCZOS),
                      dtype=np.float32)


class InitImages:
    """The run's input images, each read once and kept at every size a job asks for (:class:`InitImage`)."""

    def __init__(self) -> None:
        self.images: list[InitImage] = []
        self._pil: dict[str, Any] = {}
        self._index: dict[tuple, int] = {}

    def read(self, path: str | Path, where: str = "", what: str = "init image") -> Any:
        key = str(Path(path).expanduser())
        if key not in self._pil:
            try:
                self._pil[key] = image_io.read_image(key, what)
            except SdgenError as exc:
                raise SdgenError(f"{where}: {exc}" if where else str(exc)) from None
        return self._pil[key]

    def add(self, path: str | Path, size: Optional[tuple[int, int]], multiple: int, *, mask: Optional[str] = None,
            depth_map: Optional[str] = None) -> int:
        """The index of ``path`` at ``size`` (height, width; None: its own size rounded down to ``multiple``), with
        its inpainting ``mask`` or ``depth_map`` as a 4th channel (each must have the image's own size)."""
        extra = mask or depth_map
        key = (str(Path(path).expanduser()), size, multiple, mask, depth_map)
        if key not in self._index:
            pil = self.read(path)
            if size is None:
                tensor = image_io.image_to_tensor(pil, None, multiple)
            else:
                tensor = image_io.fit_init_image(pil, size[0], size[1], multiple)
            extra_sha = None
            if extra is not None:
                what = "mask" if mask is not None else "depth map"
                grey = read_grey(extra, what)
                if grey.shape != (pil.height, pil.width):
                    raise SdgenError(f"the {what} {extra} is {grey.shape[1]}x{grey.shape[0]} but the image {path} is "
                                     f"{pil.width}x{pil.height}: they must have the same size")
                grey = resize_grey(grey, tensor.shape[2], tensor.shape[1])
                channel = torch.from_numpy(np.clip(grey, 0.0, 1.0).copy())[None]
                tensor = torch.cat([tensor, channel])
                extra_sha = file_sha256(extra)
            self._index[key] = len(self.images)
            self.images.append(InitImage(Path(key[0]), file_sha256(key[0]), tensor,
                                         Path(extra).expanduser() if extra else None, extra_sha))
        return self._index[key]


# Working memory of the x4 upscaler per low-res pixel and image, float32 (bytes): the peak resident memory above the
# loaded weights, slope of whole runs at 32 and 64 px low-res (scripts/benchmark_upscale.py on an AMD EPYC, 2 threads,
# packed convolutions): the VAE decode 89280 B, one UNet step on the CFG batch of 2 46960 B
UPSCALE_DECODER_BYTES = 89280
UPSCALE_UNET_BYTES = 46960


def upscale_memory(height: int, width: int, batch: int) -> int:
    """Estimated peak working memory (bytes) of an untiled x4 upscale of a ``height`` x ``width`` low-res input."""
    return max(UPSCALE_DECODER_BYTES, UPSCALE_UNET_BYTES) * height * width * batch


def available_memory() -> Optional[int]:
    """Bytes of memory available to this process (Linux ``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
