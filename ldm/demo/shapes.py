"""A procedural data set of captioned simple shapes, generated on the fly (no files).

Each item is one flat-colored shape (circle, square or triangle) in one of :data:`COLORS`, of one of two sizes,
at a random position on a background of another color, with a caption such as
``"a small blue triangle on a yellow background"``. Item ``i`` depends only on ``(seed, i)``, so a data set is
reproducible and any index can be drawn in any order (and in any DataLoader worker).

Items follow the original ldm data convention: ``image`` is an ``(H, W, 3)`` float32 array in ``[-1, 1]``
(the models permute it to ``(3, H, W)``), the caption is under ``caption``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldm.errors import SdgenError

#: Named colors (sRGB, 0..255). Every color is used for shapes and for backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
#: Shape extent as a fraction of the image side, per size name (each drawn with +-10% jitter).
SIZE_FRACTION: dict[str, float] = {"small": 0.32, "large": 0.6}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one image; ``cx, cy, extent`` in pixels of the output image."""

    shape: str
    color: str
    size: str
    background: str
    cx: float
    cy: float
    extent: float


def caption_for(spec: ShapeSpec, *, with_size: bool = True, with_background: bool = True) -> str:
    """``"a [small|large] <color> <shape>[ on a <background> background]"``."""
    words = ["a"] + ([spec.size] if with_size else []) + [spec.color, spec.shape]
    text = " ".join(words)
    if with_background:
        text += f" on a {spec.background} background"
    return text


def render(spec: ShapeSpec, resolution: int = 64) -> np.ndarray:
    """Draw ``spec`` anti-aliased (4x supersampled); returns ``(resolution, resolution, 3)`` uint8."""
    if spec.shape not in SHAPES or spec.color not in COLORS or spec.background not in COLORS:
        raise SdgenError(f"unknown shape/color in {spec}")
    s = _SUPERSAMPLE
    big = resolution * s
    img = Image.new("RGB", (big, big), COLORS[spec.background])
    draw = ImageDraw.Draw(img)
    half = spec.extent * s / 2
    cx, cy = spec.cx * s, spec.cy * s
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[spec.color]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright isosceles triangle filling its bounding box (area = half of the box)
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.array(img.resize((resolution, resolution), Image.BOX), dtype=np.uint8)


def random_spec(rng: np.random.Generator, resolution: int = 64) -> ShapeSpec:
    """Draw shape, color, size, a different background color and a position that keeps the shape inside."""
    names = list(COLORS)
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = names[rng.integers(len(names))]
    others = [n for n in names if n != color]
    background = others[rng.integers(len(others))]
    size = SIZES[rng.integers(len(SIZES))]
    extent = SIZE_FRACTION[size] * resolution * rng.uniform(0.9, 1.1)
    margin = extent / 2 + 2
    cx, cy = rng.uniform(margin, resolution - margin, size=2)
    return ShapeSpec(shape, color, size, background, float(cx), float(cy), float(extent))


class ShapesDataset:
    """Map-style data set of ``length`` captioned shape images, deterministic in ``(seed, index)``.

    Args:
        length: number of items (an epoch).
        resolution: image side in pixels.
        seed: base seed; item ``i`` uses ``numpy.random.default_rng([seed, i])``.
        p_drop_size: probability that the caption omits the size word.
        p_drop_background: probability that the caption omits ``"on a ... background"``.
        p_empty_caption: probability of an empty caption (trains the unconditional branch used by
            classifier-free guidance).

    Items: ``{"image": (H, W, 3) float32 in [-1, 1], "caption": str, "index": int, "shape", "color", "size",
    "background": str}``.
    """

    def __init__(
        self,
        length: int = 100_000,
        resolution: int = 64,
        seed: int = 0,
        p_drop_size: float = 0.4,
        p_drop_background: float = 0.25,
        p_empty_caption: float = 0.1,
    ) -> None:
        for name, p in (("p_drop_size", p_drop_size), ("p_drop_background", p_drop_background),
                        ("p_empty_caption", p_empty_caption)):
            if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise SdgenError(f"ShapesDataset: {name} must be a probability in [0, 1], got {p!r}")
        if not isinstance(length, int) or length < 1:
            raise SdgenError(f"ShapesDataset: length must be a positive integer, got {length!r}")
        if not isinstance(resolution, int) or resolution < 16:
            raise SdgenError(f"ShapesDataset: resolution must be an integer >= 16, got {resolution!r}")
        if not isinstance(seed, int):
            raise SdgenError(f"ShapesDataset: seed must be an integer, got {seed!r}")
        self.length = length
        self.resolution = resolution
        self.seed = seed
        self.p_drop_size = float(p_drop_size)
        self.p_drop_background = float(p_drop_background)
        self.p_empty_caption = float(p_empty_caption)

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        """The shape parameters of item ``index`` (without rendering)."""
        return random_spec(np.random.default_rng([self.seed, index]), self.resolution)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        spec = random_spec(rng, self.resolution)
        u = rng.uniform(size=3)
        if u[0] < self.p_empty_caption:
            caption = ""
        else:
            caption = caption_for(spec, with_size=u[1] >= self.p_drop_size,
                                  with_background=u[2] >= self.p_drop_background)
        pixels = render(spec, self.resolution).astype(np.float32) / 127.5 - 1.0
        return {"image": pixels, "caption": caption, "index": index, "shape": spec.shape, "color": spec.color,
                "size": spec.size, "background": spec.background}


class ShapesDataModule:
    """Train / validation :class:`ShapesDataset` pair with DataLoaders (a LightningDataModule-like object).

    Kept free of Lightning so that importing :mod:`ldm.demo.shapes` stays light; the training module wraps it.
    """

    def __init__(self, batch_size: int = 16, num_workers: int = 0, train: dict | None = None,
                 validation: dict | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SdgenError(f"data: batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise SdgenError(f"data: num_workers must be a non-negative integer, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        try:
            self.train = ShapesDataset(**(train or {}))
            val_defaults = {"length": 64, "seed": 1_000_003, "p_empty_caption": 0.0}
            self.validation = ShapesDataset(**{**val_defaults, **(validation or {})})
        except TypeError as exc:
            raise SdgenError(f"data: {exc}") from exc

    def train_dataloader(self):  # -> torch.utils.data.DataLoader
        from torch.utils.data import DataLoader

        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self):  # -> torch.utils.data.DataLoader
        from torch.utils.data import DataLoader

        return DataLoader(self.validation, batch_size=self.batch_size, shuffle=False, num_workers=0)
