"""``--vae-tiling``: decode a large latent in overlapping tiles, so memory stays bounded by the tile size.

The latent is cut into tiles of ``tile`` x ``tile`` latent pixels that overlap by ``overlap`` on each shared
side; each tile is decoded alone and the decoded tiles are blended with weights that ramp linearly across the
overlap (normalised by their sum at each pixel), so no seam shows. The decoder's group norms and mid-block attention see one
tile instead of the whole image, so a tiled decode differs slightly from the whole one (measured on the tiny test
VAE: ``tests/test_vae_tiling.py``); images no larger than one tile are decoded whole, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_TILE = 64  # latent pixels: 512 px tiles for a factor-8 VAE
DEFAULT_OVERLAP = 16  # latent pixels: 128 px of blending


@dataclass(frozen=True)
class Tiling:
    """Tile and overlap sizes in latent pixels."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"tile overlap {self.overlap} must be in [0, tile {self.tile})")


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering ``length`` with stride ``tile - overlap``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(size: int, start: int, tile: int, starts: list[int], factor: int) -> torch.Tensor:
    """Blend weights (tile * factor,) along one axis of the tile at ``start``: 1 inside, ramping down over the
    part shared with the previous / next tile."""
    n = tile * factor
    w = torch.ones(n, dtype=torch.float32)
    index = starts.index(start)
    if index > 0:
        shared = (starts[index - 1] + tile - start) * factor
        if shared > 0:
            w[:shared] = torch.linspace(0, 1, shared + 2, dtype=torch.float32)[1:-1]
    if index < len(starts) - 1:
        shared = (start + tile - starts[index + 1]) * factor
        if shared > 0:
            w[n - shared:] = torch.minimum(w[n - shared:],
                                           torch.linspace(1, 0, shared + 2, dtype=torch.float32)[1:-1])
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int,
                 tiling: Tiling = Tiling()) -> torch.Tensor:
    """``decode`` (latent (B, C, h, w) -> image (B, 3, h f, w f)) applied tile by tile to ``z`` and blended.

    Memory is that of decoding one tile plus the output image; a latent no larger than a tile is decoded whole.
    """
    b, _, h, w = z.shape
    tile_h, tile_w = min(tiling.tile, h), min(tiling.tile, w)
    if h <= tiling.tile and w <= tiling.tile:
        return decode(z)
    rows, cols = _starts(h, tile_h, tiling.overlap), _starts(w, tile_w, tiling.overlap)
    out, total = None, torch.zeros(h * factor, w * factor, dtype=torch.float32)
    for top in rows:
        wy = _ramp(h, top, tile_h, rows, factor)
        for left in cols:
            wx = _ramp(w, left, tile_w, cols, factor)
            piece = decode(z[:, :, top:top + tile_h, left:left + tile_w])
            if out is None:
                out = torch.zeros(b, piece.shape[1], h * factor, w * factor, dtype=torch.float32, device=piece.device)
            weight = wy[:, None] * wx[None, :]
            rows_px = slice(top * factor, (top + tile_h) * factor)
            cols_px = slice(left * factor, (left + tile_w) * factor)
            out[:, :, rows_px, cols_px] += piece.float() * weight.to(piece.device)
            total[rows_px, cols_px] += weight
    return (out / total.to(out.device)).to(z.dtype)


__all__ = ["Tiling", "tiled_decode", "DEFAULT_TILE", "DEFAULT_OVERLAP"]
