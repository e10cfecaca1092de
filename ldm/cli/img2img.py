"""``sdgen img2img``: variations of an input image (CompVis ``scripts/img2img.py``, same flags and defaults).

With an SDXL config the run is SDEdit on that model (SGM's img2img: the ``int(strength * (steps + 1))`` lowest
noise levels of the grid), with the SDXL micro-conditioning flags and the SGM demo's sampling defaults.
"""

from __future__ import annotations

from ldm.cli import options as o

img2img = o.command(
    "img2img", o.COMMON_FLAGS[:2] + ("init_img", "strength") + o.COMMON_FLAGS[2:]
    + o.SDXL_FLAGS + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS,
    "Make variations of an input image guided by a prompt (CompVis scripts/img2img.py flags and defaults).",
)
