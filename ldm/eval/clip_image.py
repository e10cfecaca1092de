"""CLIP ViT-L/14's image tower for evaluation (Q16), from the files a user has at hand (``--clip PATH``):

- a transformers folder (``openai/clip-vit-large-patch14``: ``config.json`` + weights), read offline;
- a state dict with transformers' names (``vision_model.*`` + ``visual_projection.weight``, a whole ``CLIPModel``'s
  file included), or the CompVis safety checker's weights (the same names under one more ``vision_model.``:
  the checker is a ``CLIPVisionModel`` ViT-L/14 with a 768-d projection, the same network; whether its weights
  equal OpenAI's was not checked here);
- an SD 2.1 unCLIP-L checkpoint, whose ``embedder.model.visual.*`` is OpenAI's CLIP ViT-L/14 image tower in
  open_clip layout.

Every source gives :class:`ClipImageTower`: uint8 images (N, 3, H, W) -> projected image embeddings (N, D) float32,
with CLIPImageProcessor's preprocessing (:func:`ldm.eval.q16.clip_preprocess`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import torch

from ldm.errors import SdgenError
from ldm.eval.q16 import clip_preprocess

HF_VISION = "vision_model."
HF_PROJECTION = "visual_projection.weight"
OPEN_CLIP_VISUAL = "embedder.model.visual."


class ClipImageTower:
    """``tower(uint8 images (N, 3, H, W)) -> (N, D)`` float32 embeddings; ``source`` names the file."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], dim: int, source: str,
                 device: torch.device | str = "cpu") -> None:
        self._forward, self.dim, self.source, self.device = forward, dim, source, torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(clip_preprocess(images).to(self.device)).float().cpu()


def _hf_tower(state: Mapping[str, torch.Tensor], source: str, config: Mapping | None, device) -> ClipImageTower:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    weight = state["vision_model.embeddings.patch_embedding.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
    values = dict(config or {})
    width = int(weight.shape[0])
    positions = int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
    patch = int(weight.shape[-1])
    values.update(hidden_size=width, num_hidden_layers=layers, patch_size=patch,
                  image_size=patch * int(math.isqrt(positions - 1)),
                  intermediate_size=int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                  projection_dim=int(state[HF_PROJECTION].shape[0]))
    values.setdefault("num_attention_heads", max(1, width // 64))
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**values)).eval()
    wanted = {k: v for k, v in state.items() if k.startswith(HF_VISION) or k == HF_PROJECTION}
    missing, _ = model.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise SdgenError(f"--clip {source}: the CLIP image tower lacks {len(missing)} tensors (e.g. {missing[0]})")
    model.to(device)
    return ClipImageTower(lambda x: model(pixel_values=x).image_embeds, int(state[HF_PROJECTION].shape[0]), source,
                          device)


def _open_clip_tower(state: Mapping[str, torch.Tensor], source: str, device) -> ClipImageTower:
    from ldm.modules.encoders.image_embedders import ClipImageEmbedder

    visual = {k[len(OPEN_CLIP_VISUAL):]: v for k, v in state.items() if k.startswith(OPEN_CLIP_VISUAL)}
    conv = visual["conv1.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("transformer.resblocks."))
    patch = int(conv.shape[-1])
    cfg = {"embed_dim": int(visual["proj"].shape[1]), "vision_width": int(conv.shape[0]), "vision_layers": layers,
           "vision_patch_size": patch,
           "image_resolution": patch * int(math.isqrt(int(visual["positional_embedding"].shape[0]) - 1)),
           "context_length": 77, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1,
           "transformer_layers": 1}
    tower = ClipImageEmbedder(model_cfg=cfg).model.visual
    tower.load_state_dict(visual, strict=True)
    tower.eval().to(device)
    return ClipImageTower(tower, cfg["embed_dim"], source, device)


def load_clip_image_tower(path: str | Path, device: torch.device | str = "cpu", dim: int | None = 768) -> ClipImageTower:
    """The image tower in ``path`` (module docstring); ``dim`` the embedding width the metric needs (SdgenError
    when the file's differs: Q16's prompts are 768-d, CLIP ViT-L/14)."""
    from ldm.checkpoint_reader import read_state_dict

    p = Path(path).expanduser()
    if not p.exists():
        raise SdgenError(f"--clip not found: {path}")
    config = None
    if p.is_dir():
        files = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not files:
            raise SdgenError(f"--clip {path}: a transformers CLIP folder holds model.safetensors or pytorch_model.bin")
        if (p / "config.json").is_file():
            raw = json.loads((p / "config.json").read_text())
            config = raw.get("vision_config", raw)
            config = {k: v for k, v in config.items() if k in ("hidden_act", "layer_norm_eps", "num_attention_heads")}
        p = files[0]
    state = read_state_dict(p, "CLIP weights")
    if any(k.startswith("vision_model.vision_model.") for k in state):  # the CompVis safety checker
        state = {k[len(HF_VISION):] if k.startswith("vision_model.vision_model.") else k: v for k, v in state.items()}
    if "vision_model.embeddings.patch_embedding.weight" in state and HF_PROJECTION in state:
        tower = _hf_tower(state, str(path), config, device)
    elif OPEN_CLIP_VISUAL + "conv1.weight" in state:
        tower = _open_clip_tower(state, str(path), device)
    else:
        raise SdgenError(f"--clip {path} holds no CLIP image tower (transformers vision_model.* with "
                         "visual_projection, or an unCLIP-L checkpoint's embedder.model.visual.*)")
    if dim is not None and tower.dim != dim:
        raise SdgenError(f"--clip {path} makes {tower.dim}-d image embeddings; Q16's prompts are {dim}-d "
                         "(OpenAI CLIP ViT-L/14)")
    return tower


__all__ = ["ClipImageTower", "load_clip_image_tower"]
