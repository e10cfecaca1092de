"""The Karlo prior's files in a run: where they are, what they must hold, and loading them.

- the prior checkpoint (``--prior``; the original's path ``checkpoints/karlo_models/prior-ckpt-step=01000000-
  of-01000000.ckpt``): a pickled Lightning dict whose ``state_dict`` holds the 256 ``model.*`` tensors (read
  without running pickled code), or a .safetensors copy;
- its config (``--prior-config``; else a ``.yaml`` of the same name beside the prior; else
  ``configs/karlo/prior_1B_vit_l.yaml``);
- the CLIP ViT-L/14 text tower: the unCLIP-L checkpoint's ``embedder.model.*`` text half, or ``--prior-clip``
  (a state dict; Karlo's TorchScript ``ViT-L-14.pt`` is refused with the conversion to run);
- Karlo's ``ViT-L-14_stats.th`` (``--clip-stats``, else beside the prior), which de-normalises the prior's output
  and normalises the decoder's noise augmentation.

:func:`plan_prior` checks all of it before anything is loaded (one :class:`~ldm.errors.SdgenError` line each).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.errors import SdgenError
from ldm.model_id import KARLO_KEYS  # keys only the Karlo prior has

logger = logging.getLogger(__name__)

DEFAULT_PRIOR = "checkpoints/karlo_models/prior-ckpt-step=01000000-of-01000000.ckpt"
PRIOR_CONFIG = "configs/karlo/prior_1B_vit_l.yaml"
STATS_NAME = "ViT-L-14_stats.th"
EMBEDDER_TEXT = "embedder.model.transformer."
TEXT_ANCHOR = "token_embedding.weight"


@dataclass(frozen=True)
class PriorSpec:
    """A run's prior, checked: its checkpoint and sha256, its config (path and loaded), the CLIP text tower file
    (None: the unCLIP checkpoint's own) and the statistics file (None: none found, the identity is used)."""

    checkpoint: Path
    sha256: str
    config_path: Path
    config: Any
    clip: Optional[Path] = None
    stats: Optional[Path] = None


def _params(config: Any) -> Mapping[str, Any]:
    return config["model"]["params"]


def prior_widths(config: Any) -> tuple[int, int, int]:
    """(xf_width, clip_dim, text_width) of a prior config."""
    p = _params(config)
    return int(p.get("xf_width", 2048)), int(p.get("clip_dim", 768)), int(p.get("text_width") or p.get("clip_dim", 768))


def decoder_embedding_dim(unclip_config: Any) -> int:
    """The image-embedding width an unCLIP decoder takes: half its ADM input (embedding | level embedding)."""
    unet = unclip_config["model"]["params"]["unet_config"]["params"]
    return int(unet["adm_in_channels"]) // 2


def clip_text_entries(path: Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict's text half (open_clip / OpenAI names, any prefix before ``token_embedding.weight``)
    as ``embedder.model.*`` entries; Karlo's TorchScript ``ViT-L-14.pt`` is refused with the conversion."""
    from ldm.models.diffusion.unclip import read_clip_weights

    state = read_clip_weights(path, "CLIP text-tower weights")
    prefixes = [k[: -len(TEXT_ANCHOR)] for k in state if k.endswith(TEXT_ANCHOR)]
    if not prefixes:
        raise SdgenError(f"--prior-clip {path} holds no CLIP text tower (no '*token_embedding.weight' key)")
    prefix = min(prefixes, key=len)
    parts = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {"embedder.model." + k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(parts)}


def _text_tower_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> tuple[int, int]:
    """(token-state width, embedding width) of the CLIP text tower stored under ``prefix``."""
    return int(shapes[prefix + "ln_final.weight"][0]), int(shapes[prefix + "text_projection"][1])


def plan_prior(opts: Any, unclip_config: Any, unclip_shapes: Mapping[str, tuple[int, ...]]) -> PriorSpec:
    """Check the prior's files against each other and the unCLIP model (raises SdgenError; loads no tensor)."""
    from ldm.checkpoint import load_model_config
    from ldm.checkpoint_reader import check_checkpoint_file
    from ldm.model_files import checkpoint_shapes, file_sha256, find_file
    from ldm.model_id import identify

    beside = find_file(opts.prior or DEFAULT_PRIOR).with_suffix(".yaml")  # a config beside the prior, as for models
    config_path = find_file(opts.prior_config) if opts.prior_config else (beside if beside.is_file()
                                                                          else find_file(PRIOR_CONFIG))
    if not config_path.is_file():
        raise SdgenError(f"prior config not found: {opts.prior_config or PRIOR_CONFIG} (pass --prior-config PATH)")
    config = load_model_config(config_path)
    width, clip_dim, text_width = prior_widths(config)
    decoder_dim = decoder_embedding_dim(unclip_config)
    if decoder_dim != clip_dim:
        hint = (" unCLIP-H's decoder takes OpenCLIP ViT-H/14 image embeddings; the Karlo prior makes ViT-L/14 ones: "
                "use sd21-unclip-l.ckpt") if decoder_dim == 1024 else ""
        raise SdgenError(f"the unCLIP decoder takes {decoder_dim}-d image embeddings, the Karlo prior makes "
                         f"{clip_dim}-d ones.{hint}")
    path = find_file(opts.prior or DEFAULT_PRIOR)
    if not path.is_file():
        where = f"--prior {opts.prior}" if opts.prior else f"{DEFAULT_PRIOR} (where the original looks for it)"
        raise SdgenError(f"the Karlo prior was not found: {where}; unCLIP-L text-to-image needs Karlo's "
                         "prior-ckpt-step=01000000-of-01000000.ckpt: pass --prior PATH")
    check_checkpoint_file(path, "Karlo prior")
    shapes = checkpoint_shapes(path)
    identity = identify(shapes)
    if identity.kind != "karlo-prior":
        looks = f" (it looks like a model for {identity.config})" if identity.config else ""
        raise SdgenError(f"--prior {path} is not the Karlo prior: it lacks {KARLO_KEYS[0]} and the fused attention "
                         f"weights of Karlo's prior transformer{looks}")
    stored = shapes["model.clip_img_proj.weight"]
    if tuple(stored) != (width, clip_dim):
        raise SdgenError(f"--prior {path} holds a prior of width {stored[0]} for {stored[1]}-d embeddings; the prior "
                         f"config {config_path.name} describes width {width} for {clip_dim}-d ones (--prior-config)")
    clip = find_file(opts.prior_clip) if opts.prior_clip else None
    if clip is not None:
        if not clip.is_file():
            raise SdgenError(f"--prior-clip not found: {opts.prior_clip}")
        entries = {k: tuple(v.shape) for k, v in clip_text_entries(clip).items()}
        tower = _text_tower_shapes(entries, "embedder.model.")
        where = f"--prior-clip {clip}"
    elif any(k.startswith(EMBEDDER_TEXT) for k in unclip_shapes):
        tower = _text_tower_shapes(unclip_shapes, "embedder.model.")
        entries = {}
        where = "the unCLIP checkpoint's CLIP text tower"
    else:
        raise SdgenError("the unCLIP checkpoint holds no CLIP text tower (embedder.model.transformer.*) for the Karlo "
                         "prior; pass --prior-clip with OpenAI CLIP ViT-L/14 weights (.safetensors, or .pt with "
                         "weights only)")
    if tower != (text_width, clip_dim):
        raise SdgenError(f"{where} is {tower[0]} wide with {tower[1]}-d embeddings; the Karlo prior reads a CLIP text "
                         f"tower {text_width} wide with {clip_dim}-d embeddings (OpenAI CLIP ViT-L/14: 768 and 768)")
    if clip is not None:
        build = _embedder_text_shapes(unclip_config)
        wrong = [k for k, shape in entries.items() if k in build and tuple(build[k]) != shape]
        missing = [k for k in build if k not in entries]
        if wrong or missing:
            first = (wrong or missing)[0]
            raise SdgenError(f"--prior-clip {clip} does not fit the unCLIP model's CLIP text tower: "
                             f"{len(wrong)} mis-shaped, {len(missing)} missing tensors (e.g. {first})")
    stats = _stats_file(opts, path)
    return PriorSpec(path, file_sha256(path), config_path, config, clip, stats)


def _embedder_text_shapes(unclip_config: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of the unCLIP model's ``embedder.model`` text half, from its config (built on meta)."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        embedder = instantiate_from_config(unclip_config["model"]["params"]["embedder_config"])
    parts = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {"embedder.model." + k: tuple(v.shape) for k, v in embedder.model.state_dict().items() if k.startswith(parts)}


def _stats_file(opts: Any, prior: Path) -> Optional[Path]:
    """``--clip-stats`` (must exist), else ``ViT-L-14_stats.th`` beside the prior (as Karlo's folder holds it), else
    None (the identity, with a notice)."""
    from ldm.model_files import find_file

    if opts.clip_stats:
        stats = find_file(opts.clip_stats)
        if not stats.is_file():
            raise SdgenError(f"--clip-stats not found: {opts.clip_stats} (Karlo's {STATS_NAME})")
        return stats
    beside = prior.parent / STATS_NAME
    return beside if beside.is_file() else None


def missing_stats_notice(spec: PriorSpec) -> Optional[str]:
    """The one-line notice of a prior run without Karlo's statistics (None when they are there)."""
    if spec.stats is not None:
        return None
    return (f"the Karlo prior runs without {STATS_NAME} (not given with --clip-stats, not beside the prior): its "
            "embeddings are de-normalised with mean 0 / std 1 instead of the CLIP-L statistics it was trained with, "
            "which gives wrong images with the released files; pass --clip-stats PATH")


def load_prior(spec: PriorSpec, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None):
    """Build the prior from its config on the meta device and assign the checkpoint's tensors (strictly)."""
    from ldm.checkpoint import assign_state_dict, build_model_on_meta
    from ldm.checkpoint_reader import read_state_dict

    model = build_model_on_meta(spec.config)
    state = read_state_dict(spec.checkpoint, "Karlo prior")
    logger.info("loading the Karlo prior %s", spec.checkpoint)
    return assign_state_dict(model, state, device=device, dtype=dtype, source=os.fspath(spec.checkpoint),
                             config_name=os.fspath(spec.config_path)).eval()


__all__ = ["DEFAULT_PRIOR", "PRIOR_CONFIG", "PriorSpec", "clip_text_entries", "load_prior", "missing_stats_notice",
           "plan_prior"]
