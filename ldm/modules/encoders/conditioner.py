"""SDXL conditioning: several embedders -> one cond dict (SGM ``sgm/modules/encoders/modules.py``).

:class:`GeneralConditioner` runs its embedders in config order on ``batch[embedder.input_key]`` and routes each
output by rank: 2-D -> ``"vector"`` (concatenated on dim 1), 3-D -> ``"crossattn"`` (on dim 2, the feature
dim), 4-D/5-D -> ``"concat"`` (on dim 1). An embedder returning (tokens, pooled) feeds both crossattn and
vector. SDXL base: crossattn = CLIP-L 768 ⊕ bigG 1280 = 2048; vector = pooled 1280 ⊕ 3 × 512 size/crop
Fourier features = 2816.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import AbstractEncoder
from ldm.util import instantiate_from_config

OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}


class ConcatTimestepEmbedderND(AbstractEncoder):
    """Sinusoidal features of each number of a (B, d) tensor, concatenated -> (B, d·outdim).

    Used for SDXL's original size (h, w), crop (top, left), target size (h, w) and aesthetic score: each
    number gets ``timestep_embedding(v, outdim)`` ([cos | sin], max_period 10000, float32), blocks in input
    order. A 1-D input (B,) is one number per sample.
    """

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise SdgenError(f"ConcatTimestepEmbedderND expects (B,) or (B, d) values, got shape {tuple(x.shape)}")
        b, d = x.shape
        emb = timestep_embedding(x.reshape(b * d), self.outdim)
        return emb.reshape(b, d * self.outdim)


class GeneralConditioner(nn.Module):
    """Multi-embedder conditioner (SGM ``GeneralConditioner``); keys ``embedders.N.*`` in config order.

    Each entry of ``emb_models`` is a config (target, params) plus ``input_key`` (or ``input_keys``),
    ``is_trainable`` (default False: frozen, run without gradients), ``ucg_rate`` and ``legacy_ucg_value``
    (training-time condition dropout; only applied in training mode, from an explicit generator).
    """

    def __init__(self, emb_models: Iterable[Mapping[str, Any]]) -> None:
        super().__init__()
        embedders = []
        for n, cfg in enumerate(emb_models):
            embedder = instantiate_from_config(cfg)
            if not isinstance(embedder, nn.Module):
                raise SdgenError(f"conditioner embedder {n} ({cfg.get('target')}) is not a torch module")
            embedder.is_trainable = bool(cfg.get("is_trainable", False))
            embedder.ucg_rate = float(cfg.get("ucg_rate", 0.0))
            embedder.legacy_ucg_value = cfg.get("legacy_ucg_value", None)
            if "input_key" in cfg:
                embedder.input_key = cfg["input_key"]
            elif "input_keys" in cfg:
                embedder.input_keys = list(cfg["input_keys"])
            else:
                raise SdgenError(f"conditioner embedder {n} ({cfg.get('target')}) needs input_key or input_keys")
            if not embedder.is_trainable:
                if isinstance(embedder, AbstractEncoder):
                    embedder.freeze()
                else:
                    embedder.requires_grad_(False).eval()
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _embedder_input(self, embedder: nn.Module, batch: Mapping[str, Any], generator: torch.Generator | None):
        value = batch[embedder.input_key]
        legacy = getattr(embedder, "legacy_ucg_value", None)
        if self.training and legacy is not None and embedder.ucg_rate > 0:
            # SGM possibly_get_ucg_val: replace a sample's input by the "empty" value with prob ucg_rate
            drop = torch.rand(len(value), generator=generator) < embedder.ucg_rate
            value = [legacy if d else v for v, d in zip(value, drop.tolist())]
        if isinstance(value, torch.Tensor):
            value = value.to(self.device)
        return [value]

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch dict (e.g. ``{"txt": [str], "original_size_as_tuple": (B, 2), ...}``) -> cond dict.

        Args:
            batch: inputs by key; text as a list of strings, numbers as tensors (B, d).
            force_zero_embeddings: input keys whose embeddings are replaced by zeros (SDXL base uncond: "txt").
            generator: only used in training mode with ucg_rate > 0.

        Returns:
            {"crossattn": (B, 77, sum D), "vector": (B, sum V), "concat": ...} as the embedders produce.
        """
        zero_keys = set(force_zero_embeddings or ())
        output: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            context = nullcontext() if embedder.is_trainable else torch.no_grad()
            with context:
                if getattr(embedder, "input_key", None) is not None:
                    args = self._embedder_input(embedder, batch, generator)
                else:
                    args = [batch[k] for k in embedder.input_keys]
                options, min_chunks = batch.get("txt_options") or (None, 1)
                if options is not None and getattr(embedder, "input_key", None) == "txt":
                    emb_out = embedder(*args, options=options, min_chunks=min_chunks)
                else:
                    emb_out = embedder(*args)
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                if emb.dim() not in OUTPUT_DIM2KEYS:
                    raise SdgenError(f"embedder output of rank {emb.dim()} cannot be routed")
                key = OUTPUT_DIM2KEYS[emb.dim()]
                if self.training and embedder.ucg_rate > 0 and embedder.legacy_ucg_value is None:
                    keep = torch.bernoulli(torch.full((emb.shape[0],), 1.0 - embedder.ucg_rate), generator=generator)
                    emb = emb * keep.to(emb).reshape(-1, *([1] * (emb.dim() - 1)))
                if getattr(embedder, "input_key", None) in zero_keys:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), KEY2CATDIM[key]) if key in output else emb
        return output

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Sequence[str] | None = None,
        force_cond_zero_embeddings: Sequence[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) dicts; uncond from ``batch_uc`` (default ``batch_c``), with the given keys zeroed.

        Condition dropout never applies here (SGM sets the ucg rates to 0 for this call); the module is put in
        eval mode for the two calls and restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            c = self(batch_c, force_cond_zero_embeddings)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            self.train(was_training)
        return c, uc
