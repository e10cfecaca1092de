"""The bundled demo model's world: the procedural captioned-shapes data set and the quality classifier."""
