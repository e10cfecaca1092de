"""``sdgen safe-txt2img``: txt2img with Safe Latent Diffusion (Schramowski et al., 2022, arXiv 2211.05105).

The txt2img flags and defaults, plus the SLD settings: a preset (``--sld weak|medium|strong|max``, the
Safe Stable Diffusion model card's values, default medium = the authors' pipeline defaults) or a settings
file (``--sld-config PATH``), each field overridable by its flag, and the safety concept
(``--safety-concept``, default the paper's list of inappropriate categories). SLD changes no weights and works on
the guided denoiser of any model: SD 1.x / 2.x (eps or v), unCLIP and SDXL.
"""

from __future__ import annotations

from ldm.cli import options as o
from ldm.cli.sld import SLD_FLAGS, sld_options

safe_txt2img = o.command(
    "safe-txt2img", o.COMMON_FLAGS[:2] + tuple(SLD_FLAGS) + o.COMMON_FLAGS[2:]
    + o.SDXL_FLAGS + o.TEXT_FLAGS + o.PERF_FLAGS + o.RUN_FLAGS,
    "Generate images from a text prompt with Safe Latent Diffusion guidance away from inappropriate content.",
    own=SLD_FLAGS, options=lambda given: sld_options("safe-txt2img", given),
)
