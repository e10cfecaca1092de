"""Safe Latent Diffusion guidance (Schramowski et al., 2022, arXiv 2211.05105) as a denoiser wrapper.

SLD changes no weights. Besides the unconditional and the prompt prediction it asks the network for a
prediction conditioned on a text describing inappropriate content (the safety concept) and, where the prompt
prediction lies close to the concept's, pushes the guided prediction away from it. The update is written on
eps (noise) predictions, and unlike classifier-free guidance it is not linear (it thresholds and clamps the
difference eps_text - eps_safety), so the guider converts the denoiser's x0 estimates back to eps with
eps = (x - x0) / sigma, combines them, and returns x0 = x - sigma * eps: the same ``D(x, sigma, cond) -> x0``
contract as every other guider, so every sampler gets SLD.

Warm-up and momentum count *sampler steps*, not network calls: a sampler that evaluates the denoiser twice
in a step (Heun, PLMS's first step) sees the same step index and the same momentum in both calls, and the
momentum advances once, from the step's first evaluation. The sampler loop reports the end of each step
through its callback; chain :meth:`SLDGuider.on_step_end` into it (:meth:`SLDGuider.wrap_callback`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch

from ldm.sampling.denoiser import append_dims
from ldm.sampling.guidance import CFGDenoiser, cat_conds
from ldm.sld_config import SLDParams, params_from_record, png_settings

logger = logging.getLogger(__name__)

# Calls of the denoiser inside one sampler step; more means the step callback is not wired to the guider.
_MAX_CALLS_PER_STEP = 4


def sld_enabled(params: SLDParams, cfg_scale: float) -> bool:
    """Whether the safety term is used: s_S > 1 and classifier-free guidance on (scale > 1).

    Same condition as the authors' pipeline (``enable_safety_guidance``); otherwise generation is plain CFG
    and the safety concept is not evaluated.
    """
    return params.guidance_scale > 1.0 and cfg_scale > 1.0


def sld_combine(
    eps_uncond: torch.Tensor,
    eps_text: torch.Tensor,
    eps_safety: torch.Tensor,
    momentum: torch.Tensor,
    step: int,
    cfg_scale: float,
    params: SLDParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SLD guidance combination, element-wise on eps-shaped tensors (B, C, H, W).

    ``step`` is the sampler step index from 0, ``momentum`` the momentum nu before this step (zeros at step 0).
    Returns (guided eps, momentum after this step). Equation numbers are the paper's, as the authors'
    pipeline (diffusers StableDiffusionPipelineSafe) annotates them.
    """
    # classifier-free guidance direction: eps_p - eps_uncond
    guidance = eps_text - eps_uncond
    diff = eps_text - eps_safety
    # eq. 6: per-element scale s_S * |eps_p - eps_S|, clamped to at most 1 ...
    scale = torch.clamp(diff.abs() * params.guidance_scale, max=1.0)
    # ... and zero where eps_p - eps_S >= lambda (signed difference, as in the reference pipeline)
    scale = torch.where(diff >= params.threshold, torch.zeros_like(scale), scale)
    # eq. 4: safety guidance gamma = mu * (eps_S - eps_uncond)
    safety = (eps_safety - eps_uncond) * scale
    # eq. 7: momentum term, gamma_t = mu (eps_S - eps_uncond) + s_m * nu_t
    safety = safety + params.momentum_scale * momentum
    # eq. 8: nu_{t+1} = beta_m * nu_t + (1 - beta_m) * gamma_t, updated during warm-up too
    new_momentum = params.momentum_beta * momentum + (1.0 - params.momentum_beta) * safety
    # eq. 3: eps = eps_uncond + s_g (eps_p - eps_uncond - gamma), only after delta warm-up steps
    if step >= params.warmup_steps:
        guidance = guidance - safety
    return eps_uncond + cfg_scale * guidance, new_momentum


class SLDGuider:
    """Classifier-free guidance plus Safe Latent Diffusion safety guidance around a denoiser.

    ``denoiser(x, sigma, cond) -> x0`` (x in the sampler's VE space, sigma (B,)). Called with
    ``cond = {"uncond": dict, "cond": dict, "safety": dict}`` (the ``"safety"`` entry conditions on the
    safety concept, shaped like ``"cond"``), it evaluates [uncond, prompt, safety concept] in one batched
    call (the reference pipeline's batch order) and returns the guided x0 estimate (B, C, H, W).

    When SLD is not enabled (:func:`sld_enabled`) it is exactly classifier-free guidance (the
    ``fallback`` guider, by default :class:`~ldm.sampling.guidance.CFGDenoiser`) and ignores ``"safety"``.
    State (momentum, step index) belongs to one sampling run: call :meth:`reset` before reusing it.
    """

    def __init__(
        self,
        denoiser: Callable[..., torch.Tensor],
        scale: float,
        params: SLDParams,
        fallback: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)
        self.params = params
        self.enabled = sld_enabled(params, self.scale)
        self.fallback = fallback if fallback is not None else CFGDenoiser(denoiser, self.scale)
        self.reset()

    def reset(self) -> None:
        """Forget the momentum and start again at step 0."""
        self.step = 0
        self.momentum: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._calls_in_step = 0

    def on_step_end(self, info: Mapping[str, Any] | int | None = None) -> None:
        """Mark the end of a sampler step (its callback; ``info["i"]`` or an int is the finished step).

        Commits the momentum computed in the step's first evaluation and moves to the next step index.
        """
        if isinstance(info, Mapping) and "i" in info:
            finished = int(info["i"])
        elif isinstance(info, int):
            finished = info
        else:
            finished = self.step
        if self._pending is not None:
            self.momentum = self._pending
        self._pending = None
        self._calls_in_step = 0
        self.step = finished + 1

    def wrap_callback(self, callback: Callable[[dict], Any] | None) -> Callable[[dict], Any]:
        """A sampler callback that first advances this guider, then calls ``callback`` (if any)."""

        def step_callback(info: dict) -> Any:
            self.on_step_end(info)
            return callback(info) if callback is not None else None

        return step_callback

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Mapping[str, Any], **kwargs: Any
    ) -> torch.Tensor:
        """Guided x0 estimate for x (B, C, H, W) at noise levels sigma (B,) (or a scalar).

        Extra keyword arguments go to the denoiser, as with the CFG guider.
        """
        if not self.enabled:
            return self.fallback(x, sigma, {"cond": cond["cond"], "uncond": cond["uncond"]}, **kwargs)
        if "safety" not in cond:
            raise KeyError("SLD guidance needs cond['safety'] (the encoded safety concept)")
        self._calls_in_step += 1
        if self._calls_in_step > _MAX_CALLS_PER_STEP:
            raise RuntimeError(
                "SLD guider called more than %d times in one sampler step: pass "
                "guider.wrap_callback(...) as the sampler's callback" % _MAX_CALLS_PER_STEP
            )
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        batch = x.shape[0]
        x_in = torch.cat([x, x, x], dim=0)
        sigma_in = torch.cat([sigma, sigma, sigma], dim=0)
        cond_in = cat_conds([cond["uncond"], cond["cond"], cond["safety"]])
        x0_uncond, x0_text, x0_safety = self.denoiser(x_in, sigma_in, cond_in, **kwargs).split(batch, dim=0)

        # eps = (x - x0) / sigma in the VE space, whatever the network predicts (eps or v)
        s = append_dims(sigma, x.ndim).to(x.dtype)
        eps_uncond, eps_text, eps_safety = ((x - x0) / s for x0 in (x0_uncond, x0_text, x0_safety))

        momentum = self.momentum
        if momentum is None or momentum.shape != eps_text.shape:
            momentum = torch.zeros_like(eps_text)
        eps, new_momentum = sld_combine(eps_uncond, eps_text, eps_safety, momentum, self.step, self.scale, self.params)
        if self._calls_in_step == 1:
            if self.momentum is None:
                self.momentum = momentum
            self._pending = new_momentum
        return x - s * eps


class SLDGuidance:
    """What a generation loop needs to run SLD instead of plain classifier-free guidance.

    Per batch: :meth:`guider` gives a fresh :class:`SLDGuider` (momentum and step count start anew) and
    :meth:`extra_cond` the ``{"safety": cond}`` entry, the safety concept encoded like the prompt (the
    reference pipeline tokenises and encodes it with the same text encoder, once per image of the batch).
    The loop calls the guider's ``on_step_end(info)`` from its sampler callback. ``source`` names where the
    settings came from (a preset name or a file) for the PNG parameters.
    """

    def __init__(self, params: SLDParams, source: str = "custom") -> None:
        self.params = params
        self.source = source
        self._announced = False

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SLDGuidance":
        """From the settings a run's options store (:func:`ldm.sld_config.options_record`)."""
        source, params = params_from_record(record)
        return cls(params, source)

    def enabled(self, scale: float) -> bool:
        return sld_enabled(self.params, scale)

    def png_settings(self, scale: float) -> dict[str, Any]:
        """``Key: value`` pairs for the PNG parameters of the images (see :func:`ldm.sld_config.png_settings`)."""
        return png_settings(self.params, self.source, self.enabled(scale))

    def guider(self, denoiser: Callable[..., torch.Tensor], scale: float, previous: Any = None) -> SLDGuider:
        """A fresh guider for one batch; ``previous``, the guider of the batch's previous stage (the SDXL base
        before the refiner), hands over its step count and momentum, so warm-up and momentum run over the
        whole grid."""
        if not self._announced and not self.enabled(scale):
            logger.warning(
                "safety guidance is off: it needs an SLD guidance scale > 1 and a guidance scale > 1 "
                "(got %g and %g); sampling with plain classifier-free guidance",
                self.params.guidance_scale,
                scale,
            )
        self._announced = True
        guider = SLDGuider(denoiser, scale, self.params)
        if isinstance(previous, SLDGuider):
            guider.step, guider.momentum = previous.step, previous.momentum
        return guider

    def extra_cond(self, encode: Callable[[list[str]], Mapping[str, Any]], batch_size: int, scale: float) -> dict:
        """``{"safety": encode([concept] * batch_size)}``, or {} when SLD is off (the concept is not evaluated)."""
        if not self.enabled(scale):
            return {}
        return {"safety": encode([self.params.safety_concept] * batch_size)}
