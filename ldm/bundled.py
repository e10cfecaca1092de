"""The files sdgen ships besides its code: the model configs (``configs/``) and the demo model (``models/demo/``).

In a source checkout (and an editable install of it) they lie beside the ``ldm`` package, where the original
repositories keep them. A built wheel carries them as package data under ``ldm/_bundled/`` (pyproject.toml maps
``configs/`` and ``models/demo/`` there), so an installed sdgen finds them from any working directory. Both
layouts are reached through :func:`bundled_path` with the repository-relative name (``configs/...``).
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

#: The package that holds the bundled files in an installed wheel.
PACKAGED_DATA = "_bundled"


@functools.lru_cache(maxsize=None)
def bundled_root() -> Path:
    """The folder that holds ``configs/`` and ``models/demo/``: ``ldm/_bundled`` in an installed wheel, else the
    source tree the ``ldm`` package was imported from."""
    package = Path(str(importlib.resources.files("ldm")))
    packaged = package / PACKAGED_DATA
    if (packaged / "configs").is_dir():
        return packaged
    return package.parent


def bundled_path(relative: str) -> Path:
    """The bundled file named by its repository-relative path (``configs/sdxl/sd_xl_base.yaml``)."""
    return bundled_root() / relative
