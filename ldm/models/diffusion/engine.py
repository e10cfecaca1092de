"""The SDXL model: UNet + multi-embedder conditioner + VAE + discrete denoiser (SGM ``sgm/models/diffusion.py``).

Inference counterpart of SGM's ``DiffusionEngine``: the constructor takes the parameters of the upstream yamls
(``network_config``, ``denoiser_config``, ``conditioner_config``, ``first_stage_config``, ``scale_factor``,
``disable_first_stage_autocast``; training-only ones are accepted and ignored), and the attribute names give
the released state_dict keys: ``model.diffusion_model.*``, ``conditioner.embedders.N.*``, ``first_stage_model.*``
and ``denoiser.sigmas``. The methods mirror :class:`~ldm.models.diffusion.ddpm.LatentDiffusion`
(``apply_model``, ``get_learned_conditioning``, ``encode_first_stage`` / ``get_first_stage_encoding`` /
``decode_first_stage``), so one pipeline drives SD 1/2 and SDXL.

Two SDXL specifics live here:

- the micro-conditioning (original size, crop, target size, aesthetic score) and the unconditional branch of the
  SGM demo (``scripts/demo/sampling.py``): the base zeroes the text embeddings *and* the pooled vector
  (``force_uc_zero_embeddings=["txt"]``), the refiner encodes the negative prompt;
- the first stage runs in float32 (``disable_first_stage_autocast``): the SDXL VAE overflows in float16 and
  returns NaN, which becomes a black image (diffusers#7188, #6815; facts.md 9.1). Latents and images are checked
  for NaN/inf, so such a run fails loudly instead of saving black images.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.defaults import FAMILY_DEFAULTS
from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import module_dtype
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

#: SGM ``UNCONDITIONAL_CONFIG``: a conditioner without embedders.
UNCONDITIONAL_CONFIG = {"target": "ldm.modules.encoders.conditioner.GeneralConditioner", "params": {"emb_models": []}}

#: Upstream constructor parameters that only matter for training, logging or SGM's own loading.
TRAINING_PARAMS = frozenset({
    "sampler_config", "optimizer_config", "scheduler_config", "loss_fn_config", "ckpt_path", "use_ema",
    "ema_decay_rate", "input_key", "log_keys", "no_cond_log", "compile_model", "en_and_decode_n_samples_a_time",
    "monitor", "base_learning_rate",
})

#: Aesthetic scores of the refiner's conditional / unconditional branch (SGM demo, diffusers img2img).
AESTHETIC_SCORE = FAMILY_DEFAULTS["sdxl-refine"]["sdxl"]["aesthetic_score"]
NEGATIVE_AESTHETIC_SCORE = FAMILY_DEFAULTS["sdxl-refine"]["sdxl"]["negative_aesthetic_score"]

_WRAPPERS = ("OpenAIWrapper", "IdentityWrapper")


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL size/crop/aesthetic conditioning (Podell et al. 2023, section 2.2), in pixels, height first.

    ``original_size`` (h, w), ``crop_coords`` (top, left) and ``target_size`` (h, w) are SGM's
    ``original_size_as_tuple`` / ``crop_coords_top_left`` / ``target_size_as_tuple``; the refiner reads
    ``aesthetic_score`` (conditional branch) and ``negative_aesthetic_score`` (unconditional branch) instead of
    the target size. :meth:`for_image` gives the originals' defaults for an image of ``height`` x ``width``.
    """

    original_size: tuple[int, int]
    crop_coords: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    @classmethod
    def for_image(
        cls,
        height: int,
        width: int,
        *,
        original_size: tuple[int, int] | None = None,
        crop_coords: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
    ) -> "MicroConditioning":
        """Original and target size default to the image size, crop to (0, 0), scores to the SGM demo's
        (:data:`AESTHETIC_SCORE`, :data:`NEGATIVE_AESTHETIC_SCORE`)."""
        return cls(
            original_size=tuple(original_size) if original_size is not None else (height, width),
            crop_coords=tuple(crop_coords) if crop_coords is not None else (0, 0),
            target_size=tuple(target_size) if target_size is not None else (height, width),
            aesthetic_score=AESTHETIC_SCORE if aesthetic_score is None else float(aesthetic_score),
            negative_aesthetic_score=(
                NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None else float(negative_aesthetic_score)
            ),
        )

    def values(self, unconditional: bool = False) -> dict[str, list[float]]:
        """Per-sample values by conditioner input key (SGM ``get_batch``)."""
        target = self.target_size if self.target_size is not None else self.original_size
        score = self.negative_aesthetic_score if unconditional else self.aesthetic_score
        return {
            "original_size_as_tuple": [float(v) for v in self.original_size],
            "crop_coords_top_left": [float(v) for v in self.crop_coords],
            "target_size_as_tuple": [float(v) for v in target],
            "aesthetic_score": [float(score)],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "crop_coords": list(self.crop_coords),
            "target_size": list(self.target_size) if self.target_size is not None else None,
            "aesthetic_score": self.aesthetic_score,
            "negative_aesthetic_score": self.negative_aesthetic_score,
        }


class OpenAIWrapper(nn.Module):
    """SGM ``wrappers.OpenAIWrapper``: holds the UNet as ``.diffusion_model`` and unpacks the cond dict.

    ``forward(x, t, cond)``: ``cond["concat"]`` (B, Cc, H, W) is appended to the channels of ``x``,
    ``cond["crossattn"]`` (B, L, D) is the cross-attention context and ``cond["vector"]`` (B, A) the ADM input.
    """

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        concat = cond.get("concat")
        if concat is not None:
            x = torch.cat((x, concat), dim=1)
        return self.diffusion_model(x, t, context=cond.get("crossattn"), y=cond.get("vector"))


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise a one-line :class:`SdgenError` when ``tensor`` holds NaN or inf (instead of saving a black image)."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        frac = float(bad.float().mean())
        raise SdgenError(
            f"{what} contain NaN/inf ({frac:.1%} of the values): the computation overflowed, typically float16 "
            "on the GPU; nothing was saved. Run again with --precision full (float32)"
        )


class DiffusionEngine(nn.Module):
    """SDXL base or refiner as configured by ``configs/sdxl/*.yaml`` (or the upstream SGM inference yamls).

    Attributes:
        model: :class:`OpenAIWrapper` with the UNet at ``model.diffusion_model``.
        denoiser: SGM ``DiscreteDenoiser`` (:class:`ldm.sampling.denoiser.DiscreteDenoiser`): the ascending
            training sigma table as buffer ``sigmas`` (1000,) and the eps scaling.
        conditioner: ``GeneralConditioner`` (``conditioner.embedders.N``), text + size/crop/aesthetic embedders.
        first_stage_model: the VAE (``AutoencoderKL``), frozen, kept in float32 when
            ``disable_first_stage_autocast`` (SDXL).
        scale_factor: latent scale (0.13025 for SDXL), a Python float as in SGM.
        force_uc_zero_embeddings: conditioner input keys whose embeddings are zeros in the unconditional branch;
            None in the config means the SGM demo's choice: ``["txt"]`` (base) unless the conditioner takes an
            ``aesthetic_score`` (refiner: the negative prompt is encoded).

    A config's ``sampling_defaults`` parameter is accepted and read by :mod:`ldm.defaults`, not here.
    """

    #: Buffers kept in float32 when the weights are loaded in float16 (read by ldm.checkpoint).
    keep_fp32_buffers = ("denoiser.sigmas",)

    def __init__(
        self,
        network_config: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        conditioner_config: Mapping[str, Any] | None = None,
        network_wrapper: str | None = None,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        force_uc_zero_embeddings: Sequence[str] | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        **training_params: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(training_params) - TRAINING_PARAMS)
        if unknown:
            raise TypeError(f"DiffusionEngine got unexpected parameters: {', '.join(unknown)}")
        if training_params.get("ckpt_path"):
            logger.info("DiffusionEngine: ignoring ckpt_path from the config; weights come from --ckpt")
        if network_wrapper is not None and str(network_wrapper).rsplit(".", 1)[-1] not in _WRAPPERS:
            raise SdgenError(f"DiffusionEngine: unsupported network_wrapper {network_wrapper!r} (OpenAIWrapper)")
        self.training_params = dict(training_params)
        self.model = OpenAIWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config or UNCONDITIONAL_CONFIG)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.first_stage_model.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.disable_first_stage_autocast = bool(disable_first_stage_autocast)
        self._discretization_config = dict(denoiser_config.get("params", {}).get("discretization_config") or {})
        if force_uc_zero_embeddings is None:
            force_uc_zero_embeddings = [] if "aesthetic_score" in self.conditioner_input_keys else ["txt"]
        self.force_uc_zero_embeddings = list(force_uc_zero_embeddings)

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device the model computes on: that of the UNet weights, or with ``--offload`` the GPU its modules
        move to while they run (:mod:`ldm.generation.offload`)."""
        offload = getattr(self, "offload", None)
        if offload is not None:
            return offload.device
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the UNet weights."""
        return module_dtype(self.model)

    @property
    def parameterization(self) -> str:
        """What the network predicts, from the denoiser's scaling ("eps" for SDXL)."""
        return getattr(self.denoiser.scaling, "parameterization", "eps")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Training alphabar (1000,) float64 on the CPU, as the config's discretization computes it."""
        return torch.from_numpy(self.discretization().alphas_cumprod)

    @property
    def conditioner_input_keys(self) -> list[str]:
        """Batch keys the conditioner reads, in embedder order (e.g. txt, original_size_as_tuple, ...)."""
        keys: list[str] = []
        for embedder in self.conditioner.embedders:
            for key in [getattr(embedder, "input_key", None), *getattr(embedder, "input_keys", [])]:
                if key is not None and key not in keys:
                    keys.append(key)
        return keys

    @property
    def is_refiner(self) -> bool:
        """True for refiner-style conditioning (aesthetic score instead of target size)."""
        return "aesthetic_score" in self.conditioner_input_keys

    def train(self, mode: bool = True) -> "DiffusionEngine":
        super().train(mode)
        self.first_stage_model.eval()
        return self

    # ---- sampling helpers ------------------------------------------------------------------------------------

    def make_denoiser(self, grid: str | None = None):
        """The sampler-facing ``D(x, sigma, cond) -> x0``: eps scaling, sigma quantised to the nearest table entry,
        integer t for the UNet (SGM ``DiscreteDenoiser``), on every grid."""
        return self.denoiser.bind(self.apply_model)

    def make_conditioner(self, inputs: Any = None):
        """Text plus ``inputs.micro``, the stage's size / crop / aesthetic conditioning
        (:class:`ldm.models.diffusion.conditioners.SDXLConditioner`)."""
        from ldm.models.diffusion.conditioners import SDXLConditioner

        return SDXLConditioner(self, getattr(inputs, "micro", None), getattr(inputs, "text", None))

    def discretization(self):
        """The config's ``LegacyDDPMDiscretization`` (the training schedule of the denoiser's sigma table)."""
        config = {"target": "ldm.sampling.schedules.LegacyDDPMDiscretization", **self._discretization_config}
        return instantiate_from_config(config)

    # ---- network ---------------------------------------------------------------------------------------------

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """Raw network output (eps) for x_t (B, C, H, W) at integer steps t (B,).

        ``cond``: ``{"crossattn": (B, 77, D), "vector": (B, A), "concat": optional}``. Inputs are cast to the
        UNet's dtype; the output comes back in the dtype of ``x``.
        """
        dtype = self.dtype
        cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in cond.items()}
        return self.model(x.to(dtype), t, cast).to(x.dtype)

    # ---- conditioning ----------------------------------------------------------------------------------------

    def conditioning_batch(
        self, prompts: Sequence[str], micro: MicroConditioning, unconditional: bool = False, options: Any = None,
        min_chunks: int = 1,
    ) -> dict[str, Any]:
        """The conditioner's input batch for ``prompts``: ``{"txt": [...], "<size key>": (B, d) float32, ...}``;
        with text ``options`` (:class:`ldm.modules.encoders.prompts.TextOptions`) also ``"txt_options"``."""
        values = micro.values(unconditional)
        batch: dict[str, Any] = {} if options is None else {"txt_options": (options, min_chunks)}
        for key in self.conditioner_input_keys:
            if key == "txt":
                batch[key] = list(prompts)
            elif key in values:
                batch[key] = torch.tensor([values[key]] * len(prompts), dtype=torch.float32)
            else:
                raise SdgenError(f"the SDXL conditioner needs input {key!r}, which sdgen does not provide")
        return batch

    def get_learned_conditioning(self, c: Mapping[str, Any] | Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioner batch (or a list of prompts, sized for the default 1024 x 1024) -> cond dict
        ``{"crossattn": (B, 77, D), "vector": (B, A)}``."""
        if not isinstance(c, Mapping):
            d = FAMILY_DEFAULTS["txt2img"]["sdxl"]
            c = self.conditioning_batch(list(c), MicroConditioning.for_image(d["height"], d["width"]))
        return self.conditioner(c)

    def text_encoders(self) -> list[nn.Module]:
        """The text encoders (what textual-inversion embeddings register into), in embedder order."""
        from ldm.modules.encoders.modules import TextEncoder

        return [e for e in self.conditioner.embedders if isinstance(e, TextEncoder)]

    def count_chunks(self, texts: Sequence[str], options: Any) -> int:
        """How many 77-token chunks the longest of ``texts`` needs with ``options`` (every text encoder the same)."""
        from ldm.modules.encoders.prompts import count_chunks

        return max(count_chunks(e, texts, options) for e in self.text_encoders())

    @torch.no_grad()
    def get_cond_uncond(
        self, prompts: Sequence[str], negative_prompts: Sequence[str], micro: MicroConditioning, options: Any = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(cond, uncond) dicts as the SGM demo builds them.

        The unconditional batch uses the negative prompts and the negative aesthetic score. Keys in
        :attr:`force_uc_zero_embeddings` ("txt" for the base) are zeros: the base's text context *and* pooled
        vector (its size/crop parts stay as in the conditional branch). A non-empty negative prompt is encoded
        even for the base (as diffusers does with ``force_zeros_for_empty_prompt``; the SGM demo has no negative
        prompt for the base).
        """
        if len(prompts) != len(negative_prompts):
            raise SdgenError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        zero = list(self.force_uc_zero_embeddings)
        if any(n.strip() for n in negative_prompts) and "txt" in zero:
            zero.remove("txt")
        chunks = self.count_chunks(list(prompts) + list(negative_prompts), options) if options is not None else 1
        batch_c = self.conditioning_batch(prompts, micro, options=options, min_chunks=chunks)
        batch_uc = self.conditioning_batch(negative_prompts, micro, unconditional=True, options=options,
                                           min_chunks=chunks)
        return self.conditioner.get_unconditional_conditioning(batch_c, batch_uc, force_uc_zero_embeddings=zero)

    # ---- first stage -----------------------------------------------------------------------------------------

    def _first_stage_dtype(self) -> torch.dtype:
        """float32 for SDXL (``disable_first_stage_autocast``): a float16 VAE is upcast once, here."""
        if self.disable_first_stage_autocast and module_dtype(self.first_stage_model) != torch.float32:
            logger.info("running the VAE in float32 (the SDXL VAE overflows in float16)")
            self.first_stage_model.float()
        return module_dtype(self.first_stage_model)

    def _first_stage_autocast(self, device: torch.device):
        """Autocast switched off around the VAE when ``disable_first_stage_autocast`` (SGM ``DiffusionEngine``)."""
        if self.disable_first_stage_autocast:
            return torch.autocast(device.type, enabled=False)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Image (B, 3, H, W) in [-1, 1] -> VAE posterior over (B, 4, H/8, W/8) (not yet scaled).

        For SDXL the encoder runs in float32 with autocast off: in float16 it returns NaN (diffusers#7188, #9844).
        """
        dtype = self._first_stage_dtype()
        with self._first_stage_autocast(x.device):
            return self.first_stage_model.encode(x.to(dtype))

    def get_first_stage_encoding(self, encoder_posterior: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior (sampled with ``generator``, as SGM's encoder samples) or latent -> ``scale_factor * z``."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample(generator=generator)
        else:
            raise SdgenError(f"cannot take a latent from a {type(encoder_posterior).__name__}")
        z = self.scale_factor * z
        check_finite(z, "the encoded init image latents")
        return z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in about [-1, 1], float32 for SDXL.

        Raises :class:`SdgenError` when the latent or the decoded image holds NaN/inf.
        """
        check_finite(z, "the sampled latents")
        dtype = self._first_stage_dtype()
        z = 1.0 / self.scale_factor * z
        with self._first_stage_autocast(z.device):
            image = self.first_stage_model.decode(z.to(dtype))
        check_finite(image, "the decoded images")
        return image.float() if self.disable_first_stage_autocast else image.to(z.dtype)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent (SGM ``encode_first_stage``)."""
        return self.get_first_stage_encoding(self.encode_first_stage(x), generator=generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [-1, 1] (SGM ``decode_first_stage``)."""
        return self.decode_first_stage(z)
