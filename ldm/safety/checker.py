"""The Stable Diffusion safety checker: a CLIP image-embedding concept filter.

Compatible with the released checker weights (CompVis/stable-diffusion-safety-checker, diffusers
``StableDiffusionSafetyChecker``): a CLIP ViT-L/14 vision tower (``vision_model.vision_model.*``, an HF
``CLIPVisionModel``), a bias-free ``visual_projection`` to 768 dimensions, 17 concept embeddings and 3
"special care" embeddings with one threshold each. The concept texts are not shipped, only their embeddings.

Scoring (diffusers ``safety_checker.py::forward``): cosine similarity of the projected image embedding with
every concept; score = round(cos - threshold + adjustment, 3). Any special-care score > 0 sets
adjustment = 0.01 for the remaining special-care and all concept scores; an image is flagged when any of
the 17 concept scores is > 0. Flagged images are replaced by black ones, as in the original pipelines.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

# CLIP ViT-L/14 vision tower, as in the checker's config.json (the CLIPVisionConfig defaults are ViT-B/32)
VIT_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
PROJECTION_DIM = 768
NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
# OpenAI CLIP normalisation (the checker's preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# keys older transformers versions saved that the current CLIPVisionModel keeps as non-persistent buffers
_KNOWN_EXTRA_KEYS = re.compile(r".*embeddings\.position_ids$")


@dataclass
class SafetyScores:
    """One image's checker result. Scores are rounded to 3 decimals; > 0 means over the threshold.

    special_scores: (3,) scores against the special-care concepts; concept_scores: (17,) against the concepts;
    special_care: indices of special-care hits; bad_concepts: indices of concept hits; flagged: any concept hit.
    """

    special_scores: list[float] = field(default_factory=list)
    concept_scores: list[float] = field(default_factory=list)
    special_care: list[int] = field(default_factory=list)
    bad_concepts: list[int] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.bad_concepts)


def cosine_similarity(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D) x (K, D) -> (B, K) cosine similarities (diffusers names this ``cosine_distance``)."""
    a = nn.functional.normalize(image_embeds, dim=-1)
    b = nn.functional.normalize(concept_embeds, dim=-1)
    return a @ b.T


def score_embeddings(
    image_embeds: torch.Tensor,
    concept_embeds: torch.Tensor,
    concept_thresholds: torch.Tensor,
    special_embeds: torch.Tensor,
    special_thresholds: torch.Tensor,
) -> list[SafetyScores]:
    """Score projected image embeddings (B, D) against the concepts; see the module docstring.

    The similarities are taken as float32 and the per-score arithmetic is done in double precision with
    Python's round, as the reference (float32 numpy values mixed with Python-float thresholds) does.
    """
    special_cos = cosine_similarity(image_embeds, special_embeds).detach().cpu().float().numpy()
    concept_cos = cosine_similarity(image_embeds, concept_embeds).detach().cpu().float().numpy()
    special_w = [float(w) for w in special_thresholds.detach().cpu().float()]
    concept_w = [float(w) for w in concept_thresholds.detach().cpu().float()]
    results = []
    for i in range(image_embeds.shape[0]):
        res = SafetyScores()
        adjustment = 0.0
        for j, threshold in enumerate(special_w):
            score = round(float(special_cos[i, j]) - threshold + adjustment, 3)
            res.special_scores.append(score)
            if score > 0:
                res.special_care.append(j)
                adjustment = SPECIAL_CARE_ADJUSTMENT
        for k, threshold in enumerate(concept_w):
            score = round(float(concept_cos[i, k]) - threshold + adjustment, 3)
            res.concept_scores.append(score)
            if score > 0:
                res.bad_concepts.append(k)
        results.append(res)
    return results


class SafetyChecker(nn.Module):
    """CLIP vision tower + projection + concept embeddings; attribute names are the released keys.

    vision_config: overrides of the ViT-L/14 vision settings (e.g. tiny sizes for tests).
    """

    def __init__(
        self,
        vision_config: Mapping[str, Any] | None = None,
        projection_dim: int = PROJECTION_DIM,
        num_concepts: int = NUM_CONCEPTS,
        num_special_care: int = NUM_SPECIAL_CARE,
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**{**VIT_L14_VISION, **dict(vision_config or {})})
        self.vision_model = CLIPVisionModel(config)
        self.visual_projection = nn.Linear(config.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(num_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(num_special_care, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(num_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(num_special_care), requires_grad=False)

    @property
    def image_size(self) -> int:
        return int(self.vision_model.config.image_size)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, projection_dim) projected pooled CLIP image embeddings."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> list[SafetyScores]:
        """Scores for a preprocessed batch (see :func:`preprocess`)."""
        embeds = self.embed(pixel_values.to(self.visual_projection.weight))
        return score_embeddings(
            embeds,
            self.concept_embeds,
            self.concept_embeds_weights,
            self.special_care_embeds,
            self.special_care_embeds_weights,
        )

    def check(self, images: Sequence[Image.Image]) -> list[SafetyScores]:
        """Scores for PIL images of any size."""
        return self(preprocess(images, self.image_size))


def preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """The checker's CLIP preprocessing: shortest side -> ``size`` (bicubic), centre crop, CLIP mean/std.

    Uses transformers' CLIPImageProcessor with the released preprocessor settings. Returns (B, 3, size, size).
    """
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def infer_vision_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Vision-tower sizes read off the weights' shapes (heads: hidden / 64, CLIP's head width)."""
    prefix = "vision_model.vision_model."
    try:
        patch = state_dict[prefix + "embeddings.patch_embedding.weight"]
        positions = state_dict[prefix + "embeddings.position_embedding.weight"]
        fc1 = state_dict[prefix + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise SdgenError(f"key {exc.args[0]!r} is missing") from exc
    layer_key = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in state_dict if (m := layer_key.match(k))}
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    return {
        "hidden_size": hidden,
        "intermediate_size": fc1.shape[0],
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": max(1, hidden // 64),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "num_channels": channels,
    }


def load_safety_checker(
    path: str | Path,
    vision_config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> SafetyChecker:
    """Load checker weights (.safetensors, .bin, .ckpt) into a :class:`SafetyChecker` (float32, eval mode).

    The architecture is read off the weights' shapes; ``vision_config`` overrides it (e.g. the number of
    heads of a non-standard tower). Loading is strict except for the old ``position_ids`` buffer.
    """
    from ldm.checkpoint_reader import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"safety checker weights not found: {path}")
    state_dict = dict(read_state_dict(str(path), "safety-checker file"))
    state_dict = {k: v for k, v in state_dict.items() if not _KNOWN_EXTRA_KEYS.match(k)}
    try:
        config = {**infer_vision_config(state_dict), **dict(vision_config or {})}
    except SdgenError as exc:
        raise SdgenError(f"the safety-checker file {path} is not a safety checker ({exc})") from exc
    try:
        projection_dim, _ = state_dict["visual_projection.weight"].shape
        num_concepts = state_dict["concept_embeds"].shape[0]
        num_special = state_dict["special_care_embeds"].shape[0]
    except KeyError as exc:
        raise SdgenError(f"the safety-checker file {path} is not a safety checker (no {exc.args[0]!r})") from exc
    with torch.device("meta"):
        checker = SafetyChecker(config, projection_dim, num_concepts, num_special)
    state_dict = {k: v.to(torch.float32) for k, v in state_dict.items()}
    missing, unexpected = checker.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
        raise SdgenError(f"the safety-checker file {path} does not fit the safety checker: " + "; ".join(detail))
    # the non-persistent position_ids buffer is not in the file: rebuild it off the meta device
    embeddings = checker.vision_model.vision_model.embeddings
    embeddings.register_buffer(
        "position_ids", torch.arange(embeddings.num_positions).expand((1, -1)), persistent=False
    )
    return checker.to(device).eval()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float images in [0, 1] -> PIL RGB images via round(255 x), as CompVis ``check_safety``."""
    arr = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def apply_safety_checker(
    images: torch.Tensor | Sequence[Image.Image],
    checker: SafetyChecker,
) -> tuple[torch.Tensor | list[Image.Image], list[bool]]:
    """Run the checker; flagged images are replaced by black ones (new objects, inputs unchanged).

    images: (B, 3, H, W) float tensor in [0, 1] (decoded samples) or a list of PIL images.
    Returns (images of the same kind, flagged per image) and logs which indices were flagged.
    """
    if isinstance(images, torch.Tensor):
        pil = to_pil(images)
    else:
        pil = [im.convert("RGB") for im in images]
    flagged = [s.flagged for s in checker.check(pil)] if pil else []
    if any(flagged):
        logger.warning(
            "safety checker flagged image(s) %s: replaced by black images",
            ", ".join(str(i) for i, f in enumerate(flagged) if f),
        )
    if isinstance(images, torch.Tensor):
        out = images.clone()
        for i, f in enumerate(flagged):
            if f:
                out[i] = 0
        return out, flagged
    return [Image.new("RGB", im.size) if f else im for im, f in zip(images, flagged)], flagged


_NO_CHECKER_LOGGED = False


def resolve_safety_checker(
    path: str | Path | None = None,
    *,
    disabled: bool = False,
    model_config: Any = None,
    device: str | torch.device = "cpu",
) -> SafetyChecker | None:
    """The checker a run uses: ``path`` (``--safety-checker``), else the model config's ``safety_checker``
    entry (a path, or a mapping with ``path`` and optional ``vision_config``), else none.

    ``disabled`` (``--no-safety-checker``) turns it off. Without weights it says once per process that no
    checker is active, unless the config says ``safety_checker: false`` (a model that cannot draw what the
    checker looks for, as the bundled demo model of colored shapes).
    """
    global _NO_CHECKER_LOGGED
    if disabled:
        logger.info("safety checker turned off")
        return None
    vision_config = None
    if path is None and model_config is not None:
        entry = model_config.get("safety_checker", None) if hasattr(model_config, "get") else None
        if entry is False:
            logger.info("no safety checker: the model config says it needs none")
            return None
        if isinstance(entry, (str, Path)):
            path = entry
        elif entry is not None and hasattr(entry, "get"):
            path = entry.get("path", None)
            vision_config = entry.get("vision_config", None)
            if vision_config is not None and not isinstance(vision_config, dict):
                from omegaconf import OmegaConf

                vision_config = OmegaConf.to_container(vision_config, resolve=True)
    if path is None:
        if not _NO_CHECKER_LOGGED:
            logger.warning("no safety checker active (give its weights with --safety-checker PATH)")
            _NO_CHECKER_LOGGED = True
        return None
    return load_safety_checker(path, vision_config=vision_config, device=device)


def png_settings(flagged: bool | None) -> dict[str, str]:
    """The ``Safety checker`` entry of an image's PNG parameters: flagged, passed, or none (no checker ran)."""
    if flagged is None:
        return {"Safety checker": "none"}
    return {"Safety checker": "flagged" if flagged else "passed"}
