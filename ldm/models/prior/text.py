"""The prior's text side: OpenAI CLIP tokens with Karlo's mask, and the CLIP ViT-L/14 text tower's two outputs.

Tokens (Karlo ``CustomizedTokenizer``, SAI2 ``ldm/modules/karlo/kakao/models/clip.py``): ``[49406] + BPE + [49407]``
padded with 0 to 77, cut to 77 with the last id set to 49407 (as ``open_clip.tokenize``); the mask is True on the
first ``min(77, number of ids)`` positions. It is built from the count, not from ``ids != 0``: BPE can emit id 0
inside a prompt ("!"), which is a real token.

The text tower is an OpenAI CLIP model's text half in open_clip layout (``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``): for unCLIP-L the checkpoint's
``embedder.model.*`` (the whole OpenAI CLIP it was trained with). Outputs (Karlo ``encode_text``): the token
states after ``ln_final`` at all 77 positions (B, 77, W), and the pooled embedding, the state at the EOT
position (argmax of the ids) times ``text_projection`` (B, D), not normalised.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ldm.errors import SdgenError
from ldm.modules.encoders.text_towers import OpenCLIPTower
from ldm.modules.encoders.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, open_clip_tokenizer

logger = logging.getLogger(__name__)

#: the parts of a CLIP model the prior's text encoding needs (open_clip / OpenAI CLIP names)
TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def karlo_tokens(prompts: Sequence[str], context: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids (B, context) int64, mask (B, context) bool). A prompt over ``context`` tokens is cut as the
    original cuts it (the first ``context - 2`` BPE tokens, then EOT), with a warning naming the dropped words."""
    tokenizer = open_clip_tokenizer()
    ids = torch.zeros(len(prompts), context, dtype=torch.long)
    mask = torch.zeros(len(prompts), context, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        bpe = tokenizer.encode(str(prompt))
        if len(bpe) > context - 2:
            logger.warning("the Karlo prior reads the first %d tokens of a prompt (CLIP's limit, as the original); "
                           "it ignores: %r (the decoder's text encoder still sees them)", context - 2,
                           tokenizer.decode(bpe[context - 2:]).strip())
            bpe = bpe[: context - 2]
        tokens = [BOS_ID, *bpe, EOS_ID]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    return ids, mask


def has_text_tower(clip: Any) -> bool:
    """Whether a CLIP model still holds every text part (a checkpoint without them had them removed)."""
    return clip is not None and all(hasattr(clip, part) for part in TEXT_PARTS)


def text_widths(clip: Any) -> tuple[int, int]:
    """(token-state width, pooled-embedding width) of a CLIP text tower."""
    return int(clip.ln_final.weight.shape[0]), int(clip.text_projection.shape[1])


@torch.no_grad()
def encode_text(clip: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 77) -> (pooled text embedding (B, D), token states (B, 77, W)), float32."""
    if not has_text_tower(clip):
        raise SdgenError("the CLIP model has no text tower (token embedding, transformer, ln_final, projection)")
    ids = ids.to(clip.token_embedding.weight.device)
    states = clip.ln_final(OpenCLIPTower(clip)(ids)[-1])
    pooled = states[torch.arange(len(ids)), ids.argmax(dim=-1)] @ clip.text_projection
    return pooled.float(), states.float()


__all__ = ["TEXT_PARTS", "encode_text", "has_text_tower", "karlo_tokens", "text_widths"]
