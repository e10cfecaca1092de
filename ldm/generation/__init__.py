"""Generation as a library: options -> plan -> stages -> the one loop -> written images (:mod:`ldm.generation.run`)."""
