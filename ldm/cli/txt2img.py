"""``sdgen txt2img``: images from a text prompt (CompVis ``scripts/txt2img.py``, same flags and defaults).

With an SDXL config (``--config configs/sdxl/sd_xl_base.yaml``) the unset sampling flags take the SGM demo's
defaults and the SDXL micro-conditioning flags apply.
"""

from __future__ import annotations

from ldm.cli import options as o

txt2img = o.command(
    "txt2img", o.COMMON_FLAGS
    + o.SDXL_FLAGS + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS,
    "Generate images from a text prompt (CompVis scripts/txt2img.py flags and defaults; SDXL configs too).",
)
