"""The text towers' heavy part as modules over an encoder's own weights: token ids in, every hidden state out.

A text encoder reads its outputs (the last or penultimate layer, clip skip, the pooled EOT row) from these
stacked states, so the part that costs the time is one network with one output, whichever layer a model uses;
:mod:`ldm.engines` converts exactly this part.
"""

from __future__ import annotations

import torch
from torch import nn


class OpenCLIPTower(nn.Module):
    """(B, L) ids -> (n_blocks + 1, B, L, D): the embedded tokens and each resblock's output of an open_clip
    text tower, batch-first, without ``ln_final``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding
        attn_mask = model.attn_mask.to(x.device)
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        states = [x]
        for block in model.transformer.resblocks:
            x = block(x, attn_mask=attn_mask)
            states.append(x)
        out = torch.stack(states)
        return out if batch_first else out.permute(0, 2, 1, 3)


class HFCLIPTower(nn.Module):
    """(B, L) ids -> ``hidden_states`` of a transformers ``CLIPTextModel`` stacked, (n_layers + 1, B, L, D)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.transformer(input_ids=ids, output_hidden_states=True).hidden_states)


__all__ = ["HFCLIPTower", "OpenCLIPTower"]
