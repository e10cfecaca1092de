"""sdgen: Stable Diffusion inference (SD 1.x, SD 2.x / unCLIP, SDXL, Safe Latent Diffusion).

Importing :mod:`ldm` is cheap: it only exposes the version. Submodules pull in torch and friends.
"""

__version__ = "0.1.0"
