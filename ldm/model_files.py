"""Which files a run loads, and what a config or checkpoint is, before anything is built.

* Paths: :func:`find_file` (the working directory, then the files sdgen ships), :func:`resolve_checkpoint` (the
  original scripts' default paths and the demo-model fallback).
* Configs: :func:`model_kind` ("sd", "unclip", "sdxl"), the geometry the size checks need
  (:func:`vae_downsampling_factor`, :func:`latent_size_multiple`, :func:`unet_in_channels`) and the training
  schedule (:func:`config_alphas_cumprod`), all read from the YAML without building a model.
* Checkpoints: :func:`checkpoint_shapes` (header only for safetensors) and :func:`check_checkpoint_role` (SDXL
  base vs refiner); what a file is, and which config it needs, is :mod:`ldm.model_id`'s answer.
* Hashes: :func:`file_sha256` with a cache (A1111's ``Model hash`` is its first 10 digits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ldm.bundled import bundled_path
from ldm.errors import SdgenError
from ldm.model_id import KINDS

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Where the CompVis scripts expect their inputs (CV scripts/txt2img.py defaults)
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
# The SAI2 streamlit unCLIP demo's checkpoint path
DEFAULT_UNCLIP_CKPT = "checkpoints/sd21-unclip-l.ckpt"
# The SAI2 scripts take these files as an argument; sdgen looks for them in the same checkpoints/ folder
DEFAULT_INPAINT_CKPT = "checkpoints/512-inpainting-ema.ckpt"
DEFAULT_DEPTH_CKPT = "checkpoints/512-depth-ema.ckpt"
DEFAULT_UPSCALE_CKPT = "checkpoints/x4-upscaler-ema.ckpt"
# The bundled demo model, used when no checkpoint is given and none is at DEFAULT_CKPT (models/demo/README.md)
DEMO_CONFIG = "configs/demo/shapes-ldm.yaml"
DEMO_CKPT = "models/demo/shapes-ldm.safetensors"

#: Bundled configs of the released files (paths relative to the repository root; ldm.model_id.KINDS).
CONFIG_SD1 = str(KINDS["sd1"].config)
CONFIG_SD2 = str(KINDS["sd2"].config)
CONFIG_SD2V = str(KINDS["sd2-v"].config)
CONFIG_UNCLIP_L = str(KINDS["unclip-l"].config)
CONFIG_UNCLIP_H = str(KINDS["unclip-h"].config)
CONFIG_SDXL_BASE = str(KINDS["sdxl-base"].config)
CONFIG_SDXL_REFINER = str(KINDS["sdxl-refiner"].config)
FILE_SDXL_BASE = "sd_xl_base_0.9.safetensors"
FILE_SDXL_REFINER = "sd_xl_refiner_0.9.safetensors"


@dataclass(frozen=True)
class ModelFiles:
    """The config and checkpoint a run loads (absolute paths)."""

    config: Path
    checkpoint: Path


# ----------------------------------------------------------------------------- paths


def find_file(path: PathLike) -> Path:
    """``path`` as given, else among the bundled files (:mod:`ldm.bundled`; the originals run from the repo root)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate.resolve()
    bundled = bundled_path(str(candidate))
    return (bundled if bundled.exists() else candidate).resolve()


def bundled_config(relative: str) -> Path:
    """Absolute path of a bundled config named relative to the repository root (e.g. :data:`CONFIG_SD1`)."""
    return bundled_path(relative)


def demo_model_files() -> Optional[ModelFiles]:
    """The bundled demo model (:data:`DEMO_CONFIG`, :data:`DEMO_CKPT`), or None where it is not installed."""
    config_path, ckpt_path = bundled_path(DEMO_CONFIG), bundled_path(DEMO_CKPT)
    if config_path.is_file() and ckpt_path.is_file():
        return ModelFiles(config=config_path.resolve(), checkpoint=ckpt_path.resolve())
    return None


def resolve_checkpoint(ckpt: Optional[str], config: Optional[str], *, demo: bool = True,
                       default_ckpt: str = DEFAULT_CKPT, default_config: str = DEFAULT_CONFIG) -> ModelFiles:
    """Decide which checkpoint and config a run uses (the one place that decision lives).

    ``None`` means "not given": the original scripts' paths (``default_ckpt``, ``default_config``). Relative paths
    are tried in the working directory, then among the bundled files. With ``demo``, when neither ``--ckpt`` nor a
    checkpoint at the default path exists and the config is the default one (or not given), the run uses the
    bundled demo model (:data:`DEMO_CKPT` with :data:`DEMO_CONFIG`, 64x64 images of simple shapes) and says so
    in one warning line.

    Raises:
        SdgenError: the config or the checkpoint does not exist (the message says where the originals
            expect the checkpoint and how to pass another one).
    """
    config_path = find_file(config or default_config)
    if not config_path.is_file():
        raise SdgenError(f"config not found: {config or default_config} (pass --config PATH)")
    ckpt_path = find_file(ckpt or default_ckpt)
    if not ckpt_path.is_file():
        if ckpt is None:
            files = demo_model_files() if demo else None
            if files is not None and config_path == find_file(DEFAULT_CONFIG):
                logger.warning(
                    "no Stable Diffusion checkpoint found (none at %s): using the bundled demo model %s "
                    "(64x64 images of simple colored shapes); pass --ckpt PATH (.ckpt or .safetensors) for a real one",
                    default_ckpt, DEMO_CKPT,
                )
                return files
            if default_ckpt == DEFAULT_CKPT:
                raise SdgenError(
                    f"checkpoint not found: {DEFAULT_CKPT} is where the original scripts expect the SD 1.x "
                    "weights (e.g. sd-v1-4.ckpt, linked or copied there); or pass --ckpt PATH (.ckpt or .safetensors)"
                )
            ckpt = default_ckpt
        raise SdgenError(f"checkpoint not found: {ckpt} (pass --ckpt PATH to a .ckpt or .safetensors file)")
    return ModelFiles(config=config_path, checkpoint=ckpt_path)


# ----------------------------------------------------------------------------- configs


def model_kind(config: Any) -> str:
    """What a loaded config builds: "sdxl" (an SGM ``DiffusionEngine``), "unclip" (Stable unCLIP) or "sd"
    (any other ``LatentDiffusion``: SD 1.x, SD 2.x, the demo model). Reads the ``model.target`` class only."""
    from ldm.util import get_obj_from_str

    node = config.get("model", config) if hasattr(config, "get") else None
    target = node.get("target") if hasattr(node, "get") else None
    try:
        cls = get_obj_from_str(str(target)) if target else None
    except SdgenError:
        cls = None
    if isinstance(cls, type):
        from ldm.models.diffusion.engine import DiffusionEngine
        from ldm.models.diffusion.unclip import ImageEmbeddingConditionedLatentDiffusion

        if issubclass(cls, DiffusionEngine):
            return "sdxl"
        if issubclass(cls, ImageEmbeddingConditionedLatentDiffusion):
            return "unclip"
        if isinstance(getattr(cls, "family", None), str):  # inpainting, depth-to-image, the x4 upscaler
            return cls.family
    return "sd"


def family_of(kind: str) -> str:
    """The defaults family of a model kind (:mod:`ldm.defaults`): "sd", "sdxl" or "unclip"."""
    return kind if kind in ("sdxl", "unclip", "inpaint", "depth", "upscale") else "sd"


def _params(config: Any) -> Mapping[str, Any]:
    try:
        return config["model"]["params"]
    except (KeyError, TypeError) as exc:
        raise SdgenError("the config has no model.params (not a model config?)") from exc


def vae_downsampling_factor(config: Any) -> int:
    """2 ** (len(ch_mult) - 1) of the config's first stage (8 for SD; 2 for the tiny test configs)."""
    try:
        params = config["model"]["params"]["first_stage_config"]["params"]
        return 2 ** (len(params["ddconfig"]["ch_mult"]) - 1)
    except (KeyError, TypeError) as exc:
        raise SdgenError("the config has no first_stage_config.params.ddconfig.ch_mult (not an SD config?)") from exc


def unet_params(config: Any) -> Optional[Mapping[str, Any]]:
    """The UNet's params in a config: ``unet_config`` (LatentDiffusion) or ``network_config`` (SDXL), else None."""
    try:
        params = config["model"]["params"]
    except (KeyError, TypeError):
        return None
    for key in ("unet_config", "network_config"):
        node = params.get(key, None) if hasattr(params, "get") else None
        if node is not None:
            return node.get("params", None) or {}
    return None


def unet_size_multiple(config: Any) -> int:
    """Latent sides must be multiples of this: 2 ** (number of UNet downsamplings), 1 when unknown."""
    params = unet_params(config)
    try:
        return 2 ** (len(params["channel_mult"]) - 1)
    except (KeyError, TypeError):
        return 1


def latent_size_multiple(config: Any) -> int:
    """Image sides must be multiples of this: VAE factor x UNet downsampling (64 for SD and SDXL)."""
    return vae_downsampling_factor(config) * unet_size_multiple(config)


def unet_in_channels(config: Any) -> Optional[int]:
    """The UNet's input channels (the latent channels C), None when the config does not say."""
    params = unet_params(config)
    try:
        return int(params["in_channels"])
    except (KeyError, TypeError):
        return None


def config_alphas_cumprod(config: Any) -> np.ndarray:
    """The training alphabar (N,) float64 a config's model will have, computed from the YAML: the
    ``LatentDiffusion`` schedule parameters, or the SDXL denoiser's discretization (``linear`` betas)."""
    from ldm.sampling.schedules import alphas_cumprod_from_betas, make_beta_schedule

    params = _params(config)
    disc = None
    try:
        disc = params["denoiser_config"]["params"]["discretization_config"].get("params", None) or {}
    except (KeyError, TypeError, AttributeError):
        pass
    if disc is not None:
        betas = make_beta_schedule("linear", int(disc.get("num_timesteps", 1000)),
                                   linear_start=float(disc.get("linear_start", 0.00085)),
                                   linear_end=float(disc.get("linear_end", 0.0120)))
    else:
        betas = make_beta_schedule(
            params.get("beta_schedule", "linear"), int(params.get("timesteps", 1000)),
            linear_start=float(params.get("linear_start", 0.00085)),  # LatentDiffusion's (SD) defaults
            linear_end=float(params.get("linear_end", 0.012)),
        )
    return alphas_cumprod_from_betas(betas)


# ----------------------------------------------------------------------------- checkpoints


def check_checkpoint_role(path: Path, role: str, flag: str) -> None:
    """Refuse a checkpoint that is not an SDXL ``role`` ("base" | "refiner") file, saying which file is expected.

    The kind comes from :func:`ldm.model_id.identify_file`: the base has a CLIP-L embedder
    (``conditioner.embedders.0.transformer.*``), the refiner only the OpenCLIP one.
    """
    from ldm.model_id import identify_file

    identity = identify_file(path)
    expected_file = FILE_SDXL_BASE if role == "base" else FILE_SDXL_REFINER
    if identity.role == role and identity.family == "sdxl":
        return
    if identity.family == "sdxl":
        other = "--ckpt" if identity.role == "base" else "--refiner-ckpt"
        found = f"the {identity.name} checkpoint (pass it as {other})"
    elif identity.config is not None:
        found = (f"not an SDXL checkpoint (it is {identity.describe()} and needs {identity.config}: use "
                 f"sdgen {identity.command})")
    elif identity.kind is not None:
        found = f"not an SDXL checkpoint (it is {identity.describe()})"
    else:
        found = "not a Stable Diffusion checkpoint sdgen recognises"
    raise SdgenError(f"{flag} {path.name} is {found}; {flag} expects the SDXL {role} file ({expected_file})")


# ----------------------------------------------------------------------------- hashes (AUTOMATIC1111 "Model hash")


def default_cache_dir() -> Path:
    """``$SDGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdgen``, else ``~/.cache/sdgen``."""
    if os.environ.get("SDGEN_CACHE_DIR"):
        return Path(os.environ["SDGEN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sdgen"


def file_sha256(path: PathLike, cache_dir: PathLike | None = None) -> str:
    """Full sha256 hex digest of a file, cached in ``cache_dir/hashes.json`` by path, size and mtime.

    Hashing a multi-GB checkpoint takes seconds, so the digest is remembered; a file that changed (size or
    modification time) is hashed again. An unwritable cache only costs the re-hash.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise SdgenError(f"cannot hash {p}: not a file")
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_file / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, cache_file)
    except OSError as exc:
        logger.debug("could not write the hash cache %s: %s", cache_file, exc)
    return digest


def model_hash(path: PathLike, cache_dir: PathLike | None = None) -> str:
    """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's sha256 (facts.md section 13)."""
    return file_sha256(path, cache_dir)[:10]


def checkpoint_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a checkpoint (:func:`ldm.model_id.read_header`: for .safetensors only the header is
    read; pickles are memory-mapped; cached for the run)."""
    from ldm.model_id import read_header

    return dict(read_header(path).shapes)
