"""``sdgen sdxl-refine``: SDXL base -> refiner hand-over, or refiner SDEdit of an existing image.

    sdgen sdxl-refine --prompt P --ckpt sd_xl_base_0.9.safetensors --refiner-ckpt sd_xl_refiner_0.9.safetensors
    sdgen sdxl-refine --prompt P --init-img base_output.png --refiner-ckpt sd_xl_refiner_0.9.safetensors

The first runs the two-stage pipeline of the SDXL model card (the base denoises the noisiest
``--high-noise-frac`` of the timesteps, the refiner finishes the same latents with the same prompt and seed);
the second is the SGM 0.9 demo's refinement: img2img (SDEdit) on the refiner with ``--strength``. Defaults
are the SGM demo's: Euler, 50 steps, guidance 5.0, 1024 x 1024, seed 42.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ldm.cli import options as o
from ldm.defaults import describe
from ldm.model_files import CONFIG_SDXL_BASE, CONFIG_SDXL_REFINER, FILE_SDXL_BASE, FILE_SDXL_REFINER

COMMAND = "sdxl-refine"


def _own(*names: str, help: str, kind: Any = Optional[str], shown: Any = False) -> tuple[Any, None]:
    return Annotated[kind, typer.Option(*names, help=help, show_default=shown)], None


OWN = {
    "refiner_ckpt": _own("--refiner-ckpt", help=f"the SDXL refiner checkpoint ({FILE_SDXL_REFINER})",
                         shown="required"),
    "ckpt": _own("--ckpt", help=f"the SDXL base checkpoint ({FILE_SDXL_BASE}) for the base -> refiner hand-over",
                 shown="none (give it or --init-img)"),
    "init_img": _own("--init-img", "--init_img", help="refine this image instead (SDEdit on the refiner)",
                     shown="none (give it or --ckpt)"),
    "high_noise_frac": _own("--high-noise-frac", kind=Optional[float], shown=describe(COMMAND, "high_noise_frac"),
                            help="share of the noise range the base runs, in (0, 1): the base takes the timesteps "
                            "t >= 1000 * (1 - frac), the refiner continues from that sigma"),
    "strength": _own("--strength", kind=Optional[float], shown=describe(COMMAND, "strength"),
                     help="with --init-img: SDEdit strength in (0, 1]; the refiner runs the int(strength * (steps + "
                     "1)) lowest noise levels of the grid"),
    "s_churn": _own("--s-churn", kind=Optional[float], shown=describe(COMMAND, "s_churn"),
                    help="Euler/Heun churn S_churn (Karras et al. alg. 2; 0 = deterministic)"),
    "s_tmin": _own("--s-tmin", kind=Optional[float], shown=describe(COMMAND, "s_tmin"),
                   help="churn only for sigma >= s_tmin"),
    "s_tmax": _own("--s-tmax", kind=Optional[float], shown=describe(COMMAND, "s_tmax"),
                   help="churn only for sigma <= s_tmax"),
    "s_noise": _own("--s-noise", kind=Optional[float], shown=describe(COMMAND, "s_noise"),
                    help="churn noise multiplier"),
    "config": _own("--config", help="base model config", shown=CONFIG_SDXL_BASE),
    "refiner_config": _own("--refiner-config", help="refiner model config", shown=CONFIG_SDXL_REFINER),
}

FLAGS = (("prompt_arg", "prompt", "refiner_ckpt", "ckpt", "init_img", "high_noise_frac", "strength", "negative_prompt",
         "from_file", "outdir", "skip_grid", "skip_save", "steps", "sampler", "schedule", "grid", "scale", "s_churn", "s_tmin",
         "s_tmax", "s_noise", "height", "width", "original_size", "crop_coords", "target_size", "aesthetic_score",
         "negative_aesthetic_score", "n_samples", "n_iter", "n_rows", "seed", "fixed_code", "config",
         "refiner_config", "precision", "device", "safety_checker", "no_safety_checker", "no_watermark")
         + o.TEXT_FLAGS + o.PERF_FLAGS + ("low_memory",) + o.RUN_FLAGS)

sdxl_refine = o.command(
    COMMAND, FLAGS, "SDXL base -> refiner hand-over (--ckpt), or refine an image with the refiner (--init-img).",
    own=OWN,
)
