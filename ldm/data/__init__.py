"""Training data: the procedural captioned-shapes data set used by the bundled demo model."""

from ldm.data.shapes import COLORS, SHAPES, SIZES, ShapeSpec, ShapesDataModule, ShapesDataset, caption_for, render

__all__ = ["COLORS", "SHAPES", "SIZES", "ShapeSpec", "ShapesDataModule", "ShapesDataset", "caption_for", "render"]
