"""Text encoders: CLIP (SD 1.x, SDXL) and OpenCLIP (SD 2.x, SDXL), plus what the image side shares with them.

Every network is built from its architecture config, never downloaded: the weights come from the Stable
Diffusion checkpoint. Module attribute names reproduce the released checkpoint keys:

* SD 1.x ``cond_stage_model.transformer.text_model.*`` (HF ``CLIPTextModel``, :class:`FrozenCLIPEmbedder`),
* SD 2.x ``cond_stage_model.model.*`` (open_clip ViT-H-14 text side, :class:`FrozenOpenCLIPEmbedder`),
* SDXL ``conditioner.embedders.N.{transformer,model}.*`` (:class:`FrozenCLIPEmbedder`,
  :class:`FrozenOpenCLIPEmbedder2`),
* unCLIP's image side (``embedder.model.*``, ``noise_augmentor.*``) is :mod:`ldm.modules.encoders.image_embedders`;
  configs keep naming those classes ``ldm.modules.encoders.modules.*`` (aliased in :mod:`ldm.util`).

Non-persistent buffers (causal masks, position ids, normalisation constants) are always created on the CPU,
even under ``with torch.device("meta")``: they are not in any checkpoint, so a model built on the meta device
is complete once its state_dict has been assigned.

Sources: CV ``ldm/modules/encoders/modules.py``, SAI2 ``ldm/modules/encoders/modules.py`` and
``ldm/modules/diffusionmodules/upscaling.py``, SGM ``sgm/modules/encoders/modules.py``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.modules.encoders.prompts import TextOptions, encode_prompts
from ldm.modules.encoders.text_towers import HFCLIPTower, OpenCLIPTower
from ldm.modules.encoders.tokenizer import (
    BOS_ID,
    CONTEXT_LENGTH,
    EOS_ID,
    OPEN_CLIP_PAD_ID,
    hf_clip_tokenizer,
    open_clip_tokenizer,
    tokenize_hf,
    tokenize_open_clip,
)

# openai/clip-vit-large-patch14 text tower (hub config.json "text_config"); eos_token_id 2 selects the
# argmax (EOT) pooling of transformers' CLIPTextTransformer, as for the released model.
HF_CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
}

# Tower that is deleted right after construction: kept minimal so that building a text encoder does not
# allocate (or randomly initialise) hundreds of millions of unused parameters.
_STUB_VISION_CFG = dict(image_size=14, patch_size=14, width=64, head_width=64, layers=1)


class AbstractEncoder(nn.Module):
    """Common behaviour: ``freeze()`` (eval mode that survives ``.train()``, no gradients) and ``encode``.

    The attributes ``is_trainable``, ``ucg_rate``, ``input_key`` and ``legacy_ucg_value`` are set by
    :class:`~ldm.modules.encoders.conditioner.GeneralConditioner` (SGM ``AbstractEmbModel``). The encoders'
    ``device`` argument is accepted for config compatibility only: a module runs where its parameters are;
    likewise the open_clip ``version`` (pretrained tag): the weights always come from the SD checkpoint.
    """

    is_trainable: bool = False
    ucg_rate: float = 0.0
    input_key: str | None = None
    legacy_ucg_value: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "AbstractEncoder":
        return super().train(False if self.frozen else mode)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self(*args, **kwargs)


class TextEncoder(AbstractEncoder):
    """A text encoder :mod:`ldm.modules.encoders.prompts` can drive: token ids in, context (and pooled) out, and
    textual-inversion embeddings added as extra tokens."""

    id_start, id_end, id_pad = BOS_ID, EOS_ID, EOS_ID

    def word_ids(self, text: str) -> list[int]:
        """The BPE ids of ``text``, without BOS / EOS."""
        raise NotImplementedError

    def embedding_ids(self, name: str) -> list[int]:
        """The token ids of the textual-inversion embedding ``name`` (:meth:`register_embedding`)."""
        return list(self._embedding_ids()[name])

    def _embedding_ids(self) -> dict[str, list[int]]:
        if "_embedding_table" not in self.__dict__:
            self.__dict__["_embedding_table"] = {}
        return self.__dict__["_embedding_table"]

    def _token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def register_embedding(self, name: str, vectors: torch.Tensor) -> list[int]:
        """Add the vectors (n, D) of a textual-inversion embedding as n new tokens; returns their ids.

        The token table grows by n rows (ids past the vocabulary); the words of the vocabulary keep theirs.
        """
        table = self._token_embedding()
        if vectors.ndim != 2 or vectors.shape[1] != table.embedding_dim:
            raise SdgenError(f"embedding {name!r} has vectors of width {tuple(vectors.shape)[-1]}, this text "
                             f"encoder needs {table.embedding_dim}")
        weight = table.weight.detach()
        start = weight.shape[0]
        grown = nn.Embedding(start + vectors.shape[0], table.embedding_dim, device=weight.device, dtype=weight.dtype)
        grown.weight.data[:start] = weight
        grown.weight.data[start:] = vectors.to(weight)
        grown.requires_grad_(False)
        self._set_token_embedding(grown)
        ids = list(range(start, start + vectors.shape[0]))
        self._embedding_ids()[name] = ids
        return ids

    def _set_token_embedding(self, table: nn.Embedding) -> None:
        raise NotImplementedError

    def tower_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower's heavy part: (N, L) ids -> every state (n_layers + 1, N, L, D), float: the token and
        position embedding, then each block's output (no final LayerNorm). What an engine replaces
        (:mod:`ldm.engines`); the outputs :meth:`encode_ids` gives are read from these states."""
        return self.tower()(ids)

    def tower(self) -> nn.Module:
        """A module over this encoder's own weights computing :meth:`tower_states` (no parameters of its own)."""
        raise NotImplementedError

    def release_tower(self) -> None:
        """Drop the tower's blocks (an engine runs them now); embeddings and final layers stay."""
        raise NotImplementedError



def causal_mask(n: int) -> torch.Tensor:
    """Additive causal attention mask (n, n): 0 on and below the diagonal, -inf above (open_clip), CPU."""
    return torch.full((n, n), float("-inf"), device="cpu").triu_(1)


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_open_clip(arch: str, model_cfg: Mapping[str, Any] | None = None, keep: str = "all") -> nn.Module:
    """An ``open_clip.model.CLIP`` from open_clip's bundled config for ``arch`` (no weights, no download).

    Args:
        arch: open_clip model name, e.g. "ViT-H-14", "ViT-bigG-14".
        model_cfg: overrides merged into the config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``), e.g. the tiny test sizes.
        keep: "text" deletes ``visual`` (SAI2/SGM text embedders), "vision" deletes the text ``transformer``
            but keeps the other text tensors (SAI2 FrozenOpenCLIPImageEmbedder), "all" keeps everything.
    """
    import open_clip
    from open_clip.model import CLIP

    base = open_clip.get_model_config(arch)
    if base is None and not model_cfg:
        raise SdgenError(f"unknown open_clip architecture {arch!r}")
    cfg = _deep_merge(base or {}, model_cfg)
    if keep == "text":
        cfg["vision_cfg"] = dict(_STUB_VISION_CFG)
    elif keep == "vision":
        cfg["text_cfg"] = {**cfg["text_cfg"], "layers": 1}
    elif keep != "all":
        raise ValueError(f"keep must be 'text', 'vision' or 'all', not {keep!r}")
    model = CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=cfg["vision_cfg"],
        text_cfg=cfg["text_cfg"],
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
    if keep == "text":
        del model.visual
    elif keep == "vision":
        del model.transformer
    model.register_buffer("attn_mask", causal_mask(cfg["text_cfg"].get("context_length", 77)), persistent=False)
    return model


class FrozenCLIPEmbedder(TextEncoder):
    """CLIP ViT-L/14 text encoder (transformers ``CLIPTextModel``) for SD 1.x and SDXL encoder 0.

    ``layer``: "last" = ``last_hidden_state`` (after the final LayerNorm; SD 1.x), "hidden" =
    ``hidden_states[layer_idx]`` (no final LayerNorm; SDXL uses 11 of 0..12), "pooled" = ``pooler_output``
    (the EOT row after the final LayerNorm) as (B, 1, D). Tokens: HF style, padded with EOS 49407.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str = "cpu",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
        text_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if layer not in self.LAYERS:
            raise SdgenError(f"FrozenCLIPEmbedder: layer must be one of {self.LAYERS}, not {layer!r}")
        if version not in HF_CLIP_TEXT_CONFIGS and not text_config:
            raise SdgenError(f"FrozenCLIPEmbedder: unknown version {version!r}; pass text_config")
        config = CLIPTextConfig(**{**HF_CLIP_TEXT_CONFIGS.get(version, {}), **dict(text_config or {})})
        if layer == "hidden" and (layer_idx is None or not 0 <= layer_idx <= config.num_hidden_layers):
            raise SdgenError(
                f"FrozenCLIPEmbedder: layer 'hidden' needs 0 <= layer_idx <= {config.num_hidden_layers}"
            )
        self.transformer = CLIPTextModel(config)
        # transformers >= 4.31 keeps position_ids as a non-persistent buffer; rebuild it on the CPU.
        self.transformer.text_model.embeddings.register_buffer(
            "position_ids",
            torch.arange(config.max_position_embeddings, device="cpu").expand((1, -1)),
            persistent=False,
        )
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled
        if freeze:
            self.freeze()

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        """(B, max_length) int64 ids, BOS 49406 ... EOS 49407, padded with 49407."""
        return tokenize_hf(text, self.max_length)

    def word_ids(self, text: str) -> list[int]:
        return hf_clip_tokenizer()(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def _set_token_embedding(self, table: nn.Embedding) -> None:
        self.transformer.text_model.embeddings.token_embedding = table

    def tower(self) -> nn.Module:
        return HFCLIPTower(self.transformer)

    def release_tower(self) -> None:
        self.transformer.text_model.encoder.layers = nn.ModuleList()

    def encode_ids(self, ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 77) ids -> (this encoder's output (N, 77, D), pooled (N, D)). ``clip_skip`` N > 1 takes the layer
        N - 1 before the usual one (with the final LayerNorm where the usual output has it, A1111's meaning)."""
        hidden_states = self.tower_states(ids)
        final_layer_norm = self.transformer.text_model.final_layer_norm
        last_hidden_state = final_layer_norm(hidden_states[-1])  # as CLIPTextTransformer computes it
        # the EOT row (transformers takes argmax of the ids, which is the first EOS: the same row)
        eot = (ids == EOS_ID).int().argmax(dim=-1)
        pooled = last_hidden_state[torch.arange(ids.shape[0], device=ids.device), eot]
        if self.layer == "last":
            z = final_layer_norm(hidden_states[-clip_skip]) if clip_skip > 1 else last_hidden_state
        elif self.layer == "pooled":
            z = pooled[:, None, :]
        else:
            z = hidden_states[self.layer_idx - (clip_skip - 1)]
        return z, pooled

    def count_ids(self) -> int:
        return self._token_embedding().num_embeddings

    def forward(self, text: Sequence[str], options: TextOptions | None = None,
                min_chunks: int = 1) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (B, 77 k, D) (and the pooled (B, D) when ``always_return_pooled``); ``options`` None is
        the original scripts' conditioning (:mod:`ldm.modules.encoders.prompts`)."""
        z, pooled = encode_prompts(self, list(text), options, min_chunks)
        if self.return_pooled:
            return z, pooled
        return z


class FrozenOpenCLIPEmbedder(TextEncoder):
    """OpenCLIP text encoder as SD 2.x uses it (SAI2 ``FrozenOpenCLIPEmbedder``, the "legacy" path).

    ``layer``: "last" runs every resblock, "penultimate" all but the last; the result then goes through
    ``ln_final`` in both cases. Tokens: open_clip style, padded with 0. Keys: ``model.*``.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cpu",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise SdgenError(f"FrozenOpenCLIPEmbedder: layer must be one of {self.LAYERS}, not {layer!r}")
        self.model = build_open_clip(arch, model_cfg, keep="text")
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.freeze()

    id_pad = OPEN_CLIP_PAD_ID

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        return tokenize_open_clip(text, self.max_length)

    def word_ids(self, text: str) -> list[int]:
        return open_clip_tokenizer().encode(text)

    def _token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def _set_token_embedding(self, table: nn.Embedding) -> None:
        self.model.token_embedding = table

    def tower(self) -> nn.Module:
        return OpenCLIPTower(self.model)

    def release_tower(self) -> None:
        self.model.transformer.resblocks = nn.ModuleList()

    def encode_with_transformer(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, L) ids -> ln_final(output of the first n - layer_idx - (clip_skip - 1) resblocks), (B, L, D)."""
        states = self.tower_states(tokens)
        n_blocks = states.shape[0] - 1 - self.layer_idx - (clip_skip - 1)
        return self.model.ln_final(states[n_blocks])

    def encode_ids(self, ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, None]:
        return self.encode_with_transformer(ids, clip_skip), None

    def forward(self, text: Sequence[str], options: TextOptions | None = None, min_chunks: int = 1) -> torch.Tensor:
        """Prompts -> (B, 77 k, D)."""
        return encode_prompts(self, list(text), options, min_chunks)[0]


class FrozenOpenCLIPEmbedder2(TextEncoder):
    """OpenCLIP text encoder as SDXL uses it (SGM ``FrozenOpenCLIPEmbedder2``).

    Non-legacy (SDXL): the crossattn output is the raw ``layer`` state ("penultimate" = input of the last
    resblock, "last" = output of all blocks), **without** ``ln_final``; pooled = ln_final(last)[EOT] @
    text_projection, EOT found as argmax of the ids. Legacy: ln_final(layer state), as SD 2.x.
    """

    LAYERS = ("pooled", "last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cpu",
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise SdgenError(f"FrozenOpenCLIPEmbedder2: layer must be one of {self.LAYERS}, not {layer!r}")
        if legacy and (always_return_pooled or layer == "pooled"):
            raise SdgenError("FrozenOpenCLIPEmbedder2: the pooled output needs legacy: false")
        self.model = build_open_clip(arch, model_cfg, keep="text")
        self.max_length = max_length
        self.layer = layer
        self.return_pooled = always_return_pooled
        self.legacy = legacy
        if freeze:
            self.freeze()

    id_pad = OPEN_CLIP_PAD_ID

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        return tokenize_open_clip(text, self.max_length)

    def word_ids(self, text: str) -> list[int]:
        return open_clip_tokenizer().encode(text)

    def _token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def _set_token_embedding(self, table: nn.Embedding) -> None:
        self.model.token_embedding = table

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Row of the EOT token of x (B, L, D) @ text_projection -> (B, embed_dim). The EOT is open_clip's
        argmax of the ids, i.e. the first EOS (textual-inversion ids past the vocabulary do not count)."""
        rows = x[torch.arange(x.shape[0], device=x.device), (tokens == EOS_ID).int().argmax(dim=-1)]
        return rows @ self.model.text_projection

    def tower(self) -> nn.Module:
        return OpenCLIPTower(self.model)

    def release_tower(self) -> None:
        self.model.transformer.resblocks = nn.ModuleList()

    def encode_with_transformer(self, tokens: torch.Tensor, clip_skip: int = 1) -> dict[str, torch.Tensor]:
        every = self.tower_states(tokens)
        n_blocks = every.shape[0] - 1 - (clip_skip - 1)  # clip_skip: the layers clip_skip - 1 before the usual ones
        states = {"penultimate": every[n_blocks - 1], "last": every[n_blocks]}
        if clip_skip > 1:  # the pooled output stays the last block's
            states["pooled_from"] = every[-1]
        if self.legacy:
            return {self.layer: self.model.ln_final(states[self.layer])}
        states["pooled"] = self.pool(self.model.ln_final(states.pop("pooled_from", states["last"])), tokens)
        return states

    def encode_ids(self, ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.encode_with_transformer(ids, clip_skip)
        return z[self.layer], z.get("pooled")

    def forward(self, text: Sequence[str], options: TextOptions | None = None,
                min_chunks: int = 1) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (B, 77 k, D) (``layer`` "pooled": (B, embed_dim)); with pooled: ((B, 77 k, D), (B, E))."""
        z, pooled = encode_prompts(self, list(text), options, min_chunks)
        if self.layer == "pooled":
            return pooled
        if self.return_pooled:
            return z, pooled
        return z
