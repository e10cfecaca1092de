"""The latent diffusion model of SD 1.x / 2.x: UNet + first stage (VAE) + cond stage (text encoder).

Inference counterpart of CV / SAI2 ``ldm/models/diffusion/ddpm.py`` (``DDPM`` + ``LatentDiffusion``): the same
constructor parameters (so the original yaml files instantiate), the same attribute names and therefore the same
state_dict keys (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` and the DDPM
schedule buffers ``betas``, ``alphas_cumprod``, ...). It is a plain :class:`torch.nn.Module`: no Lightning, no
losses, no EMA. Training wraps it (:mod:`ldm.training.trainers`); the training-only yaml parameters are
accepted, kept in :attr:`LatentDiffusion.training_params` and otherwise ignored.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.errors import SdgenError
from ldm.sampling.schedules import make_beta_schedule
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")

# The persistent DDPM schedule buffers, in registration order (CV ddpm.py ``register_schedule``).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

# Parameters of the original DDPM / LatentDiffusion constructors that only matter for training or logging.
TRAINING_PARAMS = frozenset({
    "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "use_ema", "first_stage_key", "cond_stage_key",
    "log_every_t", "clip_denoised", "loss_type", "original_elbo_weight", "l_simple_weight", "scheduler_config",
    "use_positional_encodings", "learn_logvar", "logvar_init", "make_it_fit", "ucg_training", "reset_ema",
    "reset_num_ema_updates", "num_timesteps_cond", "concat_mode", "cond_stage_forward", "scale_by_std",
    "force_null_conditioning", "base_learning_rate", "cond_stage_trainable",
})


def _as_list(value: Any) -> list[torch.Tensor]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def module_dtype(module: nn.Module | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """Dtype of a module's first floating parameter (``default`` for None or a module without one)."""
    if module is None:
        return default
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``.diffusion_model`` and routes the conditioning to it (CV ddpm.py ``DiffusionWrapper``).

    ``conditioning_key`` decides where each part of the cond dict goes:
    ``crossattn`` -> ``context``; ``concat`` -> channels of ``x``; ``adm`` -> ``y``; ``hybrid`` = concat +
    crossattn; ``crossattn-adm`` / ``hybrid-adm`` add ``y`` from the ``vector`` entry.
    """

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise SdgenError(f"unknown conditioning_key {conditioning_key!r} (one of {CONDITIONING_KEYS[1:]})")
        if OmegaConf.is_config(diff_model_config):
            diff_model_config = OmegaConf.to_container(diff_model_config, resolve=True)
        config = dict(diff_model_config)
        params = dict(config.get("params") or {})
        # SAI2 option for several cross-attention contexts fed in turn; the plain UNet concatenates them
        params.pop("sequential_crossattn", None)
        config["params"] = params
        self.diffusion_model = instantiate_from_config(config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: Sequence[torch.Tensor] | None = None,
        c_crossattn: Sequence[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Call the UNet: x (B,C,H,W), t (B,), lists of concat (B,Cc,H,W) / context (B,L,D) tensors, adm (B,A)."""
        key = self.conditioning_key
        if key in ("concat", "hybrid", "hybrid-adm"):
            if not c_concat:
                raise SdgenError(f"conditioning_key {key!r} needs a 'concat' conditioning")
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(list(c_crossattn), dim=1) if c_crossattn and key != "adm" else None
        if key in ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm") and context is None:
            raise SdgenError(f"conditioning_key {key!r} needs a 'crossattn' conditioning")
        y = None
        if key in ("crossattn-adm", "hybrid-adm", "adm"):
            # CV 'adm' passes c_crossattn[0] as y; sdgen's cond dict names it 'vector'
            y = c_adm if c_adm is not None else (c_crossattn[0] if key == "adm" and c_crossattn else None)
            if y is None:
                raise SdgenError(f"conditioning_key {key!r} needs a 'vector' conditioning")
        if key is None:
            return self.diffusion_model(x, t)
        return self.diffusion_model(x, t, context=context, y=y)


class LatentDiffusion(nn.Module):
    """Latent diffusion model (Rombach et al. 2022) as configured by the SD 1.x / 2.x yaml files.

    Attributes:
        model: :class:`DiffusionWrapper` with the UNet at ``model.diffusion_model``.
        first_stage_model: the VAE (``AutoencoderKL``), frozen.
        cond_stage_model: the text encoder (or None for unconditional models), frozen unless trainable.
        parameterization: ``"eps"``, ``"v"`` or ``"x0"`` -- what :meth:`apply_model` returns.
        scale_factor: latent scale (0.18215 for SD 1/2): a Python float, or a buffer with ``scale_by_std``
            (as in the original, so the state_dict keys match).
        num_timesteps, linear_start, linear_end, beta_schedule, image_size (latent side), channels.
        Buffers (float32, shape (num_timesteps,), computed in float64): see :data:`SCHEDULE_BUFFERS`;
        ``lvlb_weights`` (non-persistent).

    Defaults are those of Stable Diffusion (betas 0.00085..0.012, ``crossattn``); the original DDPM defaults
    (1e-4..2e-2, ``concat`` when ``conditioning_key`` is null) only matter for yamls that omit them, and every
    SD / unCLIP yaml sets both. ``conditioning_key: null`` still follows the original rule.
    """

    #: Buffers that stay float32 when the weights are converted to float16 (read by ldm.checkpoint).
    keep_fp32_buffers = SCHEDULE_BUFFERS + ("lvlb_weights", "scale_factor")

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any] | str,
        cond_stage_config: Mapping[str, Any] | str,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        parameterization: str = "eps",
        scale_factor: float = 1.0,
        conditioning_key: str | None = "crossattn",
        image_size: int = 256,
        channels: int = 3,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        v_posterior: float = 0.0,
        **training_params: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(training_params) - TRAINING_PARAMS)
        if unknown:
            raise TypeError(f"LatentDiffusion got unexpected parameters: {', '.join(unknown)}")
        if parameterization not in ("eps", "x0", "v"):
            raise SdgenError(f"parameterization must be 'eps', 'x0' or 'v', not {parameterization!r}")
        self.training_params = dict(training_params)
        self.parameterization = parameterization
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = bool(training_params.get("cond_stage_trainable", False))
        self.first_stage_key = training_params.get("first_stage_key", "image")
        self.cond_stage_key = training_params.get("cond_stage_key", "image")
        self.beta_schedule = beta_schedule
        self.v_posterior = v_posterior

        if conditioning_key is None:  # as CV when given as null: concat_mode (default True) picks 'concat'
            conditioning_key = "concat" if training_params.get("concat_mode", True) else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not training_params.get("force_null_conditioning"):
            conditioning_key = None
        self.conditioning_key = conditioning_key
        self.model = DiffusionWrapper(unet_config, conditioning_key)

        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        # per-timestep log-variance of the training loss: a plain tensor, a parameter only with learn_logvar
        logvar = torch.full((self.num_timesteps,), float(training_params.get("logvar_init", 0.0)), device="cpu")
        self.logvar = nn.Parameter(logvar) if training_params.get("learn_logvar") else logvar

        if training_params.get("scale_by_std"):
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor

        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif cond_stage_config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(cond_stage_config)
            self.cond_stage_model = model if self.cond_stage_trainable else self._frozen(model)

    # ---- schedule ------------------------------------------------------------------------------------------

    def register_schedule(
        self,
        given_betas: Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Register the DDPM schedule buffers: computed in float64 numpy, stored float32 (CV ddpm.py l.117-140)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end

        # posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020 eq. 7); v_posterior mixes in beta_t (CV ddpm.py)
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # clipped because the posterior variance is 0 at the start of the chain
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device="cpu"))

        # variational-bound weights of the training loss (float32 arithmetic on the buffers, as CV does)
        alphas32 = torch.tensor(alphas, dtype=torch.float32, device="cpu")
        if self.parameterization == "eps":
            lvlb = self.betas**2 / (2 * self.posterior_variance * alphas32 * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            ac = torch.tensor(alphas_cumprod, dtype=torch.float32, device="cpu")
            lvlb = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)
        else:
            lvlb = torch.ones_like(self.betas)
        lvlb[0] = lvlb[1]
        self.register_buffer("lvlb_weights", lvlb, persistent=False)

    # ---- stages ----------------------------------------------------------------------------------------------

    @staticmethod
    def _frozen(module: nn.Module) -> nn.Module:
        module.eval()
        for p in module.parameters():
            p.requires_grad = False
        return module

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Switch train/eval mode; the frozen first stage (and a frozen cond stage) always stay in eval."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

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

    def get_learned_conditioning(self, c: Any, options: Any = None, min_chunks: int = 1) -> torch.Tensor:
        """Encode conditioning input (for SD 1/2: a list of B prompts) -> (B, 77 k, D) context; ``options``
        (:class:`ldm.modules.encoders.prompts.TextOptions`) selects the prompt syntax and clip skip, None the
        original scripts' conditioning; the prompts get at least ``min_chunks`` chunks of 77."""
        if self.cond_stage_model is None:
            raise SdgenError("this model is unconditional: it has no conditioning encoder")
        if options is not None:
            return self.cond_stage_model(c, options=options, min_chunks=min_chunks)
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        if not isinstance(c, torch.Tensor) and callable(getattr(c, "mode", None)):
            c = c.mode()  # a Gaussian posterior (first-stage conditioning)
        return c

    def count_chunks(self, texts: Sequence[str], options: Any) -> int:
        """How many 77-token chunks the longest of ``texts`` needs with ``options``."""
        from ldm.modules.encoders.prompts import count_chunks

        return count_chunks(self.cond_stage_model, texts, options)

    def text_encoders(self) -> list[nn.Module]:
        """The text encoders (what textual-inversion embeddings register into), in conditioning order."""
        from ldm.modules.encoders.modules import TextEncoder

        return [self.cond_stage_model] if isinstance(self.cond_stage_model, TextEncoder) else []

    def encode_first_stage(self, x: torch.Tensor):
        """Image (B,3,H,W) in [-1, 1] -> the VAE posterior (a DiagonalGaussianDistribution over (B,4,H/8,W/8))."""
        return self.first_stage_model.encode(x.to(module_dtype(self.first_stage_model)))

    def get_first_stage_encoding(
        self, encoder_posterior: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior (sampled with ``generator``) or latent tensor -> ``scale_factor * z`` (CV ddpm.py)."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample(generator=generator)
        else:
            raise SdgenError(f"cannot take a latent from a {type(encoder_posterior).__name__}")
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B,4,h,w) -> image (B,3,8h,8w), roughly in [-1, 1]; divides by ``scale_factor`` first."""
        z = 1.0 / self.scale_factor * z  # same operation order as CV ddpm.py
        out = self.first_stage_model.decode(z.to(module_dtype(self.first_stage_model)))
        return out.to(z.dtype)

    # ---- sampling --------------------------------------------------------------------------------------------

    def make_denoiser(self, grid: str):
        """The sampler-facing ``D(x, sigma, cond) -> x0`` around :meth:`apply_model`: this model's
        parameterization (eps / v) and the time mode that reproduces the originals on ``grid``
        (:data:`ldm.sampling.grids.GRIDS`: integer t on the CompVis DDIM grid, continuous t for DPM-Solver ...)."""
        from ldm.sampling.denoiser import Denoiser
        from ldm.sampling.grids import time_mode

        return Denoiser(self.apply_model, self.alphas_cumprod, parameterization=self.parameterization,
                        time_mode=time_mode(grid))

    def make_conditioner(self, inputs: Any = None):
        """The text conditioner of SD 1.x / 2.x (:class:`ldm.models.diffusion.conditioners.TextConditioner`); for
        inpainting (``inputs.task == "inpaint"``), which this model has no mask input for, the conditioner that
        blends the known region in at each step
        (:class:`ldm.models.diffusion.concat_conditioners.KnownRegionConditioner`)."""
        if getattr(inputs, "task", None) == "inpaint":
            from ldm.models.diffusion.concat_conditioners import KnownRegionConditioner

            return KnownRegionConditioner(self, inputs)
        from ldm.models.diffusion.conditioners import TextConditioner

        return TextConditioner(self, getattr(inputs, "text", None))

    # ---- network ---------------------------------------------------------------------------------------------

    def apply_model(
        self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any] | torch.Tensor | None
    ) -> torch.Tensor:
        """Raw network output (eps, v or x0 per :attr:`parameterization`) for x_t (B,C,H,W) at steps t (B,).

        ``cond`` is a dict with ``"crossattn"`` (B,L,D) context, optional ``"vector"`` (B,A) ADM/label input and
        optional ``"concat"`` (B,Cc,H,W) channels (each may also be a list of tensors, concatenated as in CV);
        the original's ``c_crossattn`` / ``c_concat`` / ``c_adm`` keys are accepted too. A bare tensor is the
        crossattn (or concat, for concat models) conditioning. Inputs are cast to the UNet's dtype and the
        output is returned in the dtype of ``x``.
        """
        if cond is None:
            cond = {}
        elif isinstance(cond, (torch.Tensor, list, tuple)):
            cond = {"concat" if self.conditioning_key == "concat" else "crossattn": cond}
        dtype = self.dtype

        def cast(values: Any) -> list[torch.Tensor]:
            return [v.to(dtype) if v.is_floating_point() else v for v in _as_list(values)]

        concat = cast(cond.get("concat", cond.get("c_concat")))
        crossattn = cast(cond.get("crossattn", cond.get("c_crossattn")))
        vector = cast(cond.get("vector", cond.get("c_adm")))
        # an ADM vector (B, A), or integer class labels (B,) (the x4 upscaler's noise level)
        adm = (vector[0] if len(vector) == 1 else torch.cat(vector, dim=1)) if vector else None
        out = self.model(x.to(dtype), t, c_concat=concat, c_crossattn=crossattn, c_adm=adm)
        if isinstance(out, tuple):
            out = out[0]
        return out.to(x.dtype)
