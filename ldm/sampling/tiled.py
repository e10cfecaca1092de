"""``sdgen upscale --tile``: the denoiser evaluated on overlapping latent tiles, blended at every step.

:class:`TiledDenoiser` is itself a denoiser ``D(x, sigma, cond) -> x0`` (:mod:`ldm.sampling.denoiser`): it cuts
the latent x (B, C, h, w) into tiles of at most ``tile`` x ``tile`` latent pixels that overlap by at least
``overlap`` on each shared side, evaluates the wrapped denoiser on each tile with every cond entry that has x's
spatial size cropped alike (the upscaler's low-res ``"concat"`` image; the text ``"crossattn"`` and the class
labels ``"vector"`` pass unchanged), and blends the tiles' x0 estimates with weights that ramp linearly across
the overlaps, divided by their sum at each latent pixel. Because the blend happens at every denoiser call, the
sampler only ever sees one seamless latent (tiles blended once at the end would each follow their own
trajectory and disagree where they meet).

It sits under the guider (:class:`ldm.sampling.guidance.CFGDenoiser` calls it with the 2B batch and the
concatenated conds), so memory is that of one tile's network call. A latent no larger than one tile goes
through the wrapped denoiser unchanged. The UNet's attention and group norms see one tile at a time, so a tiled
run differs slightly from a whole one.

The default sizes can be changed for a run with the environment variable ``SDGEN_UPSCALE_TILE`` =
``"TILE,OVERLAP"`` (latent pixels, e.g. ``"16,8"``; the tests use it to tile tiny inputs).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Optional

import torch

from ldm.errors import SdgenError

#: latent pixels per tile side: the x4 upscaler was trained on 128 px low-res crops (latent = low-res size), and a
#: full-size UNet call on a 128 x 128 latent with the CFG batch of 2 needs about 0.8 GB (scripts/benchmark_upscale.py)
DEFAULT_TILE = 128
#: latent pixels shared by neighbouring tiles: a quarter of the tile, wide enough for the blend to hide the tiles'
#: disagreement at their borders, small enough that a 512 px input costs about 1.6x an untiled step
DEFAULT_OVERLAP = 32
#: tile starts are multiples of this (the UNet's downsampling: every tile sees the same pooling grid)
ALIGN = 8
TILE_ENV = "SDGEN_UPSCALE_TILE"


def tile_sizes() -> tuple[int, int]:
    """(tile, overlap) in latent pixels: ``SDGEN_UPSCALE_TILE`` = "TILE,OVERLAP" when set, else the defaults."""
    text = os.environ.get(TILE_ENV, "").strip()
    if not text:
        return DEFAULT_TILE, DEFAULT_OVERLAP
    try:
        tile, overlap = (int(v) for v in text.split(","))
    except ValueError:
        raise SdgenError(f"{TILE_ENV}={text!r}: expected two integers 'TILE,OVERLAP' (latent pixels)") from None
    return tile, overlap


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of the fewest tiles of size ``tile`` covering ``length``, neighbours sharing >= ``overlap``, spread
    evenly; starts are multiples of ``align`` (when ``length - tile`` is one), the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    if (length - tile) % align or tile - overlap < align:
        align = 1
    units, stride = (length - tile) // align, (tile - overlap) // align  # in steps of ``align``
    gaps = math.ceil(units / stride)
    return [(i * units // gaps) * align for i in range(gaps + 1)]


def tile_ramp(starts: list[int], index: int, tile: int) -> torch.Tensor:
    """Blend weights (tile,) along one axis of tile ``index``: 1 inside, ramping linearly (strictly positive)
    over the parts it shares with the previous and the next tile."""
    w = torch.ones(tile, dtype=torch.float32)
    if index > 0:
        shared = starts[index - 1] + tile - starts[index]
        if shared > 0:
            w[:shared] = torch.linspace(0, 1, shared + 2, dtype=torch.float32)[1:-1]
    if index < len(starts) - 1:
        shared = starts[index] + tile - starts[index + 1]
        if shared > 0:
            w[tile - shared:] = torch.minimum(w[tile - shared:],
                                              torch.linspace(1, 0, shared + 2, dtype=torch.float32)[1:-1])
    return w


def crop_cond(cond: Any, hw: tuple[int, int], rows: slice, cols: slice) -> Any:
    """``cond`` with every (B, C, h, w) tensor whose (h, w) is ``hw`` cropped to ``[rows, cols]``;
    other entries (text, class labels, scalars) unchanged; dicts and lists are walked."""
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 4 and tuple(cond.shape[-2:]) == hw:
            return cond[..., rows, cols]
        return cond
    if isinstance(cond, Mapping):
        return {k: crop_cond(v, hw, rows, cols) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(crop_cond(v, hw, rows, cols) for v in cond)
    return cond


class TiledDenoiser:
    """``denoiser`` evaluated tile by tile on x (B, C, h, w) and blended (see the module docstring).

    Args:
        denoiser: ``D(x, sigma, cond, **kwargs) -> x0`` (B, C, h, w).
        tile, overlap: tile side and least overlap in latent pixels (None: :func:`tile_sizes`).
        align: tile starts are multiples of it (the UNet's total downsampling).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], tile: Optional[int] = None,
                 overlap: Optional[int] = None, align: int = ALIGN) -> None:
        default_tile, default_overlap = tile_sizes()
        self.denoiser = denoiser
        self.tile = int(tile if tile is not None else default_tile)
        self.overlap = int(overlap if overlap is not None else default_overlap)
        self.align = int(align)
        if self.tile <= 0 or self.tile % self.align or not 0 <= self.overlap <= self.tile // 2:
            raise SdgenError(f"tile {self.tile} / overlap {self.overlap}: the tile must be a positive multiple of "
                             f"{self.align} latent pixels and the overlap in [0, tile / 2]")
        self._weights: dict[tuple[int, int], tuple[list, list, torch.Tensor]] = {}

    def layout(self, h: int, w: int) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]],
                                               torch.Tensor]:
        """Row and column tiles ``(start, ramp)`` of an h x w latent and the summed weights (h, w) float32."""
        if (h, w) not in self._weights:
            th, tw = min(self.tile, h), min(self.tile, w)
            rows, cols = tile_starts(h, th, self.overlap, self.align), tile_starts(w, tw, self.overlap, self.align)
            row_tiles = [(s, tile_ramp(rows, i, th)) for i, s in enumerate(rows)]
            col_tiles = [(s, tile_ramp(cols, i, tw)) for i, s in enumerate(cols)]
            total = torch.zeros(h, w, dtype=torch.float32)
            for top, wy in row_tiles:
                for left, wx in col_tiles:
                    total[top:top + th, left:left + tw] += wy[:, None] * wx[None, :]
            self._weights[(h, w)] = (row_tiles, col_tiles, total)
        return self._weights[(h, w)]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h <= self.tile and w <= self.tile:
            return self.denoiser(x, sigma, cond, **kwargs)
        row_tiles, col_tiles, total = self.layout(h, w)
        th, tw = min(self.tile, h), min(self.tile, w)
        out: Optional[torch.Tensor] = None
        dtype = x.dtype
        for top, wy in row_tiles:
            for left, wx in col_tiles:
                rows, cols = slice(top, top + th), slice(left, left + tw)
                part = self.denoiser(x[..., rows, cols], sigma, crop_cond(cond, (h, w), rows, cols), **kwargs)
                if out is None:
                    out = torch.zeros(*part.shape[:-2], h, w, dtype=torch.float32, device=part.device)
                    dtype = part.dtype
                weight = (wy[:, None] * wx[None, :]).to(part.device)
                out[..., rows, cols] += part.float() * weight
        assert out is not None
        return (out / total.to(out.device)).to(dtype)


__all__ = ["TiledDenoiser", "tile_starts", "tile_ramp", "crop_cond", "tile_sizes", "DEFAULT_TILE",
           "DEFAULT_OVERLAP", "TILE_ENV"]
