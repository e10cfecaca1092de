"""A tiny CLIP concept safety checker that flags every image (for the safety flags of every command)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.safety.checker import SafetyChecker


def write_flag_all_checker(path: Path) -> Path:
    """Save a tiny checker whose thresholds every image exceeds (cosine - (-2) > 0) to ``path``."""
    torch.manual_seed(0)
    checker = SafetyChecker({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                             "num_attention_heads": 1, "image_size": 32, "patch_size": 8}, projection_dim=16)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    sd = {k: v.contiguous() for k, v in checker.state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, str(path))
    return path
