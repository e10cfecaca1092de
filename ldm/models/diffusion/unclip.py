"""Stable unCLIP (SD 2.1 unCLIP-L / -H): latent diffusion conditioned on a CLIP image embedding.

:class:`ImageEmbeddingConditionedLatentDiffusion` is the inference counterpart of SAI2
``ldm/models/diffusion/ddpm.py::ImageEmbeddingConditionedLatentDiffusion``: a :class:`LatentDiffusion` with

* ``embedder`` -- a CLIP image tower (``ClipImageEmbedder`` = OpenAI ViT-L/14 for -L,
  ``FrozenOpenCLIPImageEmbedder`` = OpenCLIP ViT-H/14 for -H), checkpoint keys ``embedder.model.*``;
* ``noise_augmentor`` -- ``CLIPEmbeddingNoiseAugmentation`` (its own cosine schedule, keys ``noise_augmentor.*``).

The image embedding reaches the UNet as its ADM ("vector") input: ``adm = cat(noised embedding, level
embedding)`` (B, 2D), routed through ``label_emb`` and added to the time embedding (conditioning key
``crossattn-adm``; SAI2 ``get_input``). The unconditional branch of classifier-free guidance is an all-zero ADM
vector with the negative prompt's text (SAI2 ``scripts/streamlit/stableunclip.py``), which is what the model
learned from the 25 % embedding dropout of training.

:func:`load_unclip_model` loads a released file. Two pieces may live outside it: the image tower (when a copy
of the checkpoint was saved without ``embedder.*``; taken from a separate CLIP state_dict) and, for -L, Karlo's
CLIP-L embedding statistics ``ViT-L-14_stats.th`` (never in the checkpoint: the buffers are non-persistent).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Where the image embedding enters the checkpoint / the UNet.
EMBEDDER_PREFIX = "embedder.model."
VISUAL_PREFIX = EMBEDDER_PREFIX + "visual."

#: What to tell a user who hands a non-unCLIP model to an unCLIP command.
UNCLIP_FILES_HINT = (
    "Stable unCLIP needs sd21-unclip-l.ckpt (config configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml) "
    "or sd21-unclip-h.ckpt (config configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml)"
)


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    """Latent diffusion with a CLIP image embedding as ADM conditioning (SAI2, same parameter names).

    Args:
        embedder_config: target/params of the image embedder (checkpoint keys ``embedder.*``).
        embedding_key: batch key of the image (training only; kept for config compatibility).
        embedding_dropout: training-time probability of zeroing the whole ADM vector (kept, unused here).
        freeze_embedder: the embedder is frozen (always true at inference; accepted for compatibility).
        noise_aug_config: target/params of the noise augmentor, or None for a model without one.
        *args, **kwargs: :class:`LatentDiffusion` parameters.

    Attributes:
        embedder, noise_augmentor (or None), embed_key, embedding_dropout.
        clip_stats_source: where the noise augmentor's normalisation statistics came from (a path), or None
            while they are the identity.
    """

    def __init__(
        self,
        embedder_config: Mapping[str, Any],
        embedding_key: str = "jpg",
        embedding_dropout: float = 0.5,
        freeze_embedder: bool = True,
        noise_aug_config: Mapping[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.conditioning_key not in ("crossattn-adm", "hybrid-adm", "adm"):
            raise SdgenError(
                f"ImageEmbeddingConditionedLatentDiffusion needs an ADM conditioning_key (crossattn-adm), "
                f"not {self.conditioning_key!r}"
            )
        self.embed_key = embedding_key
        self.embedding_dropout = float(embedding_dropout)
        self.embedder = self._frozen(instantiate_from_config(embedder_config))
        self.noise_augmentor = instantiate_from_config(noise_aug_config) if noise_aug_config else None
        stats_path = None
        if noise_aug_config:
            stats_path = (dict(noise_aug_config).get("params") or {}).get("clip_stats_path")
        self.clip_stats_source: str | None = str(stats_path) if stats_path else None

    # ---- image embedding -> ADM vector -------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        """Width D of the image embedding (the ADM vector is 2D wide with a noise augmentor)."""
        visual = getattr(getattr(self.embedder, "model", None), "visual", None)
        dim = getattr(visual, "output_dim", None)
        if dim is None:
            raise SdgenError("cannot tell the image embedder's output width")
        return int(dim)

    @property
    def max_noise_level(self) -> int:
        """Noise levels run over ``0 .. max_noise_level - 1`` (1000 for both released models)."""
        return int(self.noise_augmentor.max_noise_level) if self.noise_augmentor is not None else 1

    @property
    def needs_clip_stats(self) -> bool:
        """True for unCLIP-L: its (OpenAI CLIP-L) embeddings were normalised with Karlo's statistics in training.

        unCLIP-H trained with the identity (no ``clip_stats_path`` in its config).
        """
        from ldm.modules.encoders.image_embedders import ClipImageEmbedder

        return self.noise_augmentor is not None and isinstance(self.embedder, ClipImageEmbedder)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> CLIP image embeddings (B, D), float32.

        The embedder resizes to its 224 px input itself (bicubic, antialiased, no crop; SAI2 ``preprocess``).
        """
        p = next(self.embedder.parameters())
        return self.embedder(images.to(device=p.device, dtype=p.dtype)).float()

    def set_clip_stats(self, mean: torch.Tensor, std: torch.Tensor, source: str | None = None) -> None:
        """Set the noise augmentor's embedding statistics, each (D,) or (1, D) (Karlo ``ViT-L-14_stats.th``)."""
        if self.noise_augmentor is None:
            raise SdgenError("this model has no noise augmentor, so no embedding statistics to set")
        want = tuple(self.noise_augmentor.data_mean.shape)
        mean = torch.as_tensor(mean).float().reshape(-1)
        std = torch.as_tensor(std).float().reshape(-1)
        if mean.numel() != want[-1] or std.numel() != want[-1]:
            raise SdgenError(
                f"CLIP statistics {source or ''} hold {mean.numel()}/{std.numel()} values, the model's image "
                f"embedding has {want[-1]} (ViT-L-14_stats.th belongs to unCLIP-L)"
            )
        if not bool((std > 0).all()):
            raise SdgenError(f"CLIP statistics {source or ''}: the standard deviations must be positive")
        device = self.noise_augmentor.data_mean.device
        self.noise_augmentor.data_mean = mean.reshape(want).to(device)
        self.noise_augmentor.data_std = std.reshape(want).to(device)
        self.clip_stats_source = source or "given tensors"

    def load_clip_stats(self, path: PathLike) -> None:
        """Read Karlo's ``ViT-L-14_stats.th`` (:func:`read_clip_stats`) and set it, see :meth:`set_clip_stats`."""
        mean, std = read_clip_stats(path)
        self.set_clip_stats(mean, std, source=os.fspath(path))

    def augment_embedding(
        self,
        embedding: torch.Tensor,
        noise_level: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Image embeddings (B, D) -> ADM vectors (B, 2D) = cat(noised embedding, level embedding) (SAI2 get_input).

        ``noise`` (B, D) standard normal, else drawn from ``generator`` (CPU). At level 0 the augmentor still
        adds sqrt(1 - alphabar[0]) ~ 0.0064 of noise, as the original does. Without a noise augmentor the
        embedding itself is the ADM vector.
        """
        if self.noise_augmentor is None:
            return embedding
        level = int(noise_level)
        if not 0 <= level < self.max_noise_level:
            raise SdgenError(f"noise level must be in 0..{self.max_noise_level - 1}, got {level}")
        self.noise_augmentor.to(embedding.device)
        noised, level_emb = self.noise_augmentor(embedding, level, generator=generator, noise=noise)
        return torch.cat([noised, level_emb], dim=1)

    def image_conditioning(
        self,
        images: torch.Tensor,
        noise_level: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ADM vectors (B, 2D): :meth:`embed_images` + :meth:`augment_embedding`."""
        return self.augment_embedding(self.embed_images(images), noise_level, noise=noise, generator=generator)

    @staticmethod
    def unconditional_adm(adm: torch.Tensor) -> torch.Tensor:
        """The unconditional ADM vector of guidance: zeros like ``adm`` (SAI2 streamlit demo, diffusers)."""
        return torch.zeros_like(adm)

    def make_conditioner(self, inputs: Any = None):
        """Text plus the init images' embeddings (:class:`ldm.models.diffusion.conditioners.ImageVariationConditioning`)
        from ``inputs.images`` and ``inputs.noise_level``, or, with ``inputs.prior``, the embeddings the Karlo prior
        makes from the prompts (:class:`ldm.models.diffusion.conditioners.PriorConditioning`)."""
        from ldm.models.diffusion.conditioners import ImageVariationConditioning, PriorConditioning

        if inputs is not None and inputs.prior is not None:
            return PriorConditioning(self, inputs.prior, inputs.prior_steps, inputs.prior_scale, inputs.noise_level,
                                     inputs.text)
        if inputs is None or not inputs.images:
            raise SdgenError("Stable unCLIP needs an init image (unclip-variate) or the Karlo prior (txt2img with "
                             "an unCLIP-L checkpoint)")
        return ImageVariationConditioning(self, inputs.images, inputs.noise_level, inputs.text)


# ------------------------------------------------------------------------------------------------------------
# recognising unCLIP configs (checkpoints: ldm.model_id)
# ------------------------------------------------------------------------------------------------------------


def is_unclip_config(config: Any) -> bool:
    """Whether a config (loaded, or its ``model`` node) builds an :class:`ImageEmbeddingConditionedLatentDiffusion`."""
    node = config.get("model", config) if hasattr(config, "get") else None
    target = node.get("target") if hasattr(node, "get") else None
    if not target:
        return False
    try:
        cls = get_obj_from_str(str(target))
    except SdgenError:
        return False
    return isinstance(cls, type) and issubclass(cls, ImageEmbeddingConditionedLatentDiffusion)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------


def _embedder_entries(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A CLIP state_dict from a separate file -> ``embedder.model.*`` keys.

    Accepts plain CLIP layouts (``visual.*``, as OpenAI's and OpenCLIP's files), and files where the model sits
    under a prefix (``embedder.model.``, ``model.``, ``clip.`` ...): the prefix of ``visual.conv1.weight`` decides.
    """
    anchor = "visual.conv1.weight"
    prefixes = [k[: -len(anchor)] for k in state_dict if k.endswith(anchor)]
    if not prefixes:
        raise SdgenError(
            f"{source} holds no CLIP image tower (no '*visual.conv1.weight' key); --embedder-ckpt takes the "
            "CLIP state_dict the unCLIP model was trained with (OpenAI ViT-L/14 for -L, OpenCLIP ViT-H-14 "
            "laion2b_s32b_b79k for -H)"
        )
    prefix = min(prefixes, key=len)
    return {EMBEDDER_PREFIX + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_clip_weights(path: PathLike, what: str = "image-embedder weights") -> dict[str, torch.Tensor]:
    """``read_state_dict`` of a CLIP weight file, with a way out for OpenAI's / Karlo's TorchScript ``ViT-L-14.pt``
    (refused, since running it would run its code, with the one-time conversion to a state dict)."""
    from ldm.checkpoint_reader import read_state_dict

    try:
        return read_state_dict(path, what)
    except SdgenError as exc:
        if "torchscript" not in str(exc).lower():
            raise
        raise SdgenError(
            f"{path} is a TorchScript archive (as OpenAI's and Karlo's ViT-L-14.pt), which sdgen does not run; save "
            "its weights once, e.g. safetensors.torch.save_file({k: v.float().contiguous() for k, v in "
            "torch.jit.load(PATH, map_location='cpu').state_dict().items()}, 'ViT-L-14.safetensors'), and pass that"
        ) from exc


def _prune_absent_embedder_parts(model: ImageEmbeddingConditionedLatentDiffusion, keys: set[str]) -> list[str]:
    """Delete the CLIP text-side leftovers of ``embedder.model`` that the file does not hold.

    unCLIP runs only ``embedder.model.visual``; the reference model also carries the (unused) text half
    (token embedding, ln_final, text projection, ...). Files may or may not store it: a part with none of its
    tensors in the file is removed, a part that is stored must be complete (the strict load checks it).
    """
    clip = getattr(model.embedder, "model", None)
    if clip is None:
        return []
    removed = []
    names = [n for n, _ in clip.named_children()] + [n for n, _ in clip.named_parameters(recurse=False)]
    for name in names:
        if name == "visual":
            continue
        prefix = f"{EMBEDDER_PREFIX}{name}"
        if not any(k == prefix or k.startswith(prefix + ".") for k in keys):
            delattr(clip, name)
            removed.append(name)
    return removed


def read_clip_stats(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read Karlo's ``ViT-L-14_stats.th``: a saved ``(mean, std)`` pair (or a dict with those keys) of tensors."""
    from ldm.checkpoint_reader import read_pickle_checkpoint

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise SdgenError(f"CLIP statistics file not found: {p} (Karlo's ViT-L-14_stats.th)")
    stats = read_pickle_checkpoint(p, "CLIP statistics file")
    if isinstance(stats, Mapping):
        stats = (stats.get("mean"), stats.get("std"))
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2 and all(torch.is_tensor(s) for s in stats)):
        raise SdgenError(f"CLIP statistics {p} must hold a (mean, std) pair of tensors")
    return stats[0], stats[1]


def _model_node(config: Any) -> Any:
    """The ``model`` node of a config given as a path, a full config or the node itself (OmegaConf)."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_config

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config)
    return config.model if config.get("model") is not None else config


def load_unclip_model(
    config: Any,
    ckpt_path: PathLike,
    *,
    embedder_ckpt: PathLike | None = None,
    clip_stats: PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    text_ckpt: PathLike | None = None,
) -> ImageEmbeddingConditionedLatentDiffusion:
    """Build a Stable unCLIP model and load ``ckpt_path`` into it (strictly, see ``ldm.checkpoint``).

    Args:
        config: config path / loaded config / ``model`` node of an unCLIP config; None picks the bundled
            unCLIP-L or -H config from the checkpoint's keys.
        ckpt_path: sd21-unclip-l.ckpt / sd21-unclip-h.ckpt (or .safetensors copies).
        embedder_ckpt: a CLIP state_dict supplying the image tower when the checkpoint lacks ``embedder.*``
            (OpenAI ViT-L/14 for -L, OpenCLIP ViT-H-14 laion2b_s32b_b79k for -H). Keys the model does not have
            (e.g. OpenCLIP's text transformer) are skipped.
        clip_stats: Karlo's ``ViT-L-14_stats.th`` for unCLIP-L (replaces the config's ``clip_stats_path``).
        device, dtype: where the weights go; dtype None = float32 (schedules stay float32).
        state_dict: the checkpoint's tensors when the caller has read them already (consumed while loading).
        text_ckpt: a CLIP state dict supplying the text half of ``embedder.model`` (the Karlo prior's text tower)
            when the checkpoint lacks it (:func:`ldm.models.prior.files.clip_text_entries`).

    Raises:
        SdgenError: not an unCLIP config or checkpoint (the message names the files unCLIP needs), a missing
            image tower without ``embedder_ckpt``, unreadable statistics, or any strict-load mismatch.
    """
    from ldm.bundled import bundled_path
    from ldm.checkpoint import assign_state_dict, build_model_on_meta
    from ldm.checkpoint_reader import read_state_dict
    from ldm.model_id import identify

    config_name = os.fspath(config) if isinstance(config, (str, os.PathLike)) else None
    node = _model_node(config) if config is not None else None
    if node is not None and not is_unclip_config(node):
        raise SdgenError(f"config {config_name or ''} does not build a Stable unCLIP model; {UNCLIP_FILES_HINT}")
    stats = read_clip_stats(clip_stats) if clip_stats is not None else None

    if state_dict is None:
        state_dict = read_state_dict(ckpt_path)
    identity = identify(state_dict)
    if identity.family != "unclip":
        looks = f" (it looks like it needs {identity.config})" if identity.config else ""
        raise SdgenError(f"checkpoint {ckpt_path} is not a Stable unCLIP checkpoint{looks}; {UNCLIP_FILES_HINT}")
    if node is None:
        config_name = os.fspath(bundled_path(str(identity.config)))
        node = _model_node(config_name)
        logger.info("%s: using %s", ckpt_path, config_name)
    if stats is not None and node.params.get("noise_aug_config") is not None:
        # statistics come from clip_stats: do not open the config's own path
        node.params.noise_aug_config.setdefault("params", {})["clip_stats_path"] = None

    if not any(k.startswith(VISUAL_PREFIX) for k in state_dict):
        if embedder_ckpt is None:
            raise SdgenError(
                f"checkpoint {ckpt_path} holds no image embedder weights (embedder.model.visual.*); pass "
                "--embedder-ckpt with the CLIP weights: OpenAI CLIP ViT-L/14 for unCLIP-L, OpenCLIP ViT-H-14 "
                "laion2b_s32b_b79k for unCLIP-H"
            )
    elif embedder_ckpt is not None:
        logger.warning("%s already holds the image embedder; ignoring %s", ckpt_path, embedder_ckpt)
        embedder_ckpt = None

    model = build_model_on_meta(node)
    if embedder_ckpt is not None:
        extra = _embedder_entries(read_clip_weights(embedder_ckpt), os.fspath(embedder_ckpt))
        expected = set(model.state_dict().keys())
        skipped = [k for k in extra if k not in expected]
        state_dict.update({k: v for k, v in extra.items() if k in expected})
        if skipped:
            logger.info("%s: skipped %d tensors the image embedder does not use (e.g. %s)",
                        embedder_ckpt, len(skipped), skipped[0])
    if text_ckpt is not None:
        from ldm.models.prior.files import clip_text_entries

        state_dict.update(clip_text_entries(Path(text_ckpt)))
    removed = _prune_absent_embedder_parts(model, set(state_dict))
    if removed:
        logger.info("image embedder: unused CLIP text-side parts not in the file, left out: %s", ", ".join(removed))

    assign_state_dict(model, state_dict, device=device, dtype=dtype, source=os.fspath(ckpt_path),
                      config_name=config_name)
    if model.noise_augmentor is not None:
        model.noise_augmentor.to(device)
    if stats is not None:
        model.set_clip_stats(stats[0], stats[1], source=os.fspath(clip_stats))
    return model


def missing_clip_stats_notice(model: ImageEmbeddingConditionedLatentDiffusion) -> str | None:
    """The notice for unCLIP-L running without Karlo's statistics (None when nothing is missing).

    Callers show it once per run (the CLI prints it as one warning line).
    """
    if not model.needs_clip_stats or model.clip_stats_source is not None:
        return None
    return (
        "unCLIP-L runs without its CLIP embedding statistics (Karlo's ViT-L-14_stats.th, not part of the "
        "checkpoint): the noise augmentation normalises with mean 0 / std 1 instead of the statistics it was "
        "trained with, which matters at noise levels above 0; pass --clip-stats PATH"
    )


__all__ = [
    "ImageEmbeddingConditionedLatentDiffusion",
    "UNCLIP_FILES_HINT",
    "is_unclip_config",
    "load_unclip_model",
    "read_clip_stats",
    "missing_clip_stats_notice",
]
