"""Karlo v1.0-alpha prior: text -> CLIP ViT-L/14 image embedding, for Stable unCLIP-L text-to-image.

:class:`KarloPrior` is the released checkpoint's module (``model.*`` = :class:`PriorTransformer`) plus the
diffusion its config describes (SAI2 ``ldm/modules/karlo/kakao/models/prior_model.py``, ``configs/karlo/
prior_1B_vit_l.yaml``): 1000 cosine (``squaredcos_cap_v2``) steps, x0-prediction, fixed-small variance.

Sampling (:func:`sample_prior`) is the original's ``p_sample_loop`` on a respaced chain (``timestep_respacing``
"25": :func:`respaced_timesteps`) written with sdgen's parts: the network as an x0 :class:`Denoiser` (integer
time on the 1000-step table), classifier-free guidance on x0 (``u + s (c - u)``, always applied, scale 4 by
default), the prediction clamped to +-10 in the normalised space, and DDIM with eta 1 on the respaced sigmas,
which is the ancestral DDPM step with the posterior variance (the DDIM sigma_t(1) equals it: Song et al. 2021,
eq. 16; the last step, to t = 0, returns the clamped x0). The result is de-normalised with Karlo's
``ViT-L-14_stats.th``: ``e = x std + mean``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.models.prior.transformer import PriorTransformer, TextPrefix
from ldm.sampling import schedules
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.grids import initial_x
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.samplers import sample_ddim

#: the x0 clamp of the original (``denoised_fn``, prior_model.py); diffusers' hub config has 5
X0_CLAMP = 10.0


def respaced_timesteps(steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The kept timesteps of ``timestep_respacing=str(steps)``, ascending (guided-diffusion ``space_timesteps``
    with one section): ``round(k * (N - 1) / (steps - 1))`` by repeated addition, Python's round-half-to-even.
    25 of 1000: 0, 42, 83, 125, 166, 208, 250, 291, 333, ..., 957, 999."""
    if not 1 <= int(steps) <= num_timesteps:
        raise SdgenError(f"--prior-steps must be in 1..{num_timesteps}, got {steps}")
    stride = 1 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    taken, index = [], 0.0
    for _ in range(int(steps)):
        taken.append(round(index))
        index += stride
    return np.array(sorted(set(taken)), dtype=np.int64)


class KarloPrior(nn.Module):
    """The released prior file's module (checkpoint keys ``model.*``) and its diffusion settings.

    Args:
        text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, clip_dim, text_width: :class:`PriorTransformer`.
        diffusion: the original config's ``diffusion`` node; sdgen runs what the released prior uses (1000
            ``squaredcos_cap_v2`` steps, ``predict_xstart``, fixed-small variance) and refuses other settings.
        x0_clamp: the clamp of the guided x0 prediction (10).
        **_: other keys of the original ``hparams`` (``text_drop``, ``type``, ...) are training matters.
    """

    def __init__(self, text_ctx: int = 77, xf_width: int = 2048, xf_layers: int = 20, xf_heads: int = 32,
                 xf_final_ln: bool = True, clip_dim: int = 768, text_width: Optional[int] = None,
                 diffusion: Optional[Mapping[str, Any]] = None, x0_clamp: float = X0_CLAMP, **_: Any) -> None:
        super().__init__()
        self.model = PriorTransformer(text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, clip_dim, text_width)
        d = {"steps": 1000, "noise_schedule": "squaredcos_cap_v2", "predict_xstart": True, "learn_sigma": False,
             "sigma_small": True, "use_kl": False, **dict(diffusion or {})}
        if not d["predict_xstart"] or d["learn_sigma"] or not d["sigma_small"] or d["use_kl"]:
            raise SdgenError("the prior config's diffusion must be x0-predicting with fixed small variance "
                             "(predict_xstart true, learn_sigma false, sigma_small true), as Karlo's")
        betas = schedules.make_beta_schedule(str(d["noise_schedule"]), int(d["steps"]))
        #: float64 (N,), as the original keeps it
        self.alphas_cumprod = schedules.alphas_cumprod_from_betas(betas)
        self.x0_clamp = float(x0_clamp)

    @property
    def clip_dim(self) -> int:
        return self.model.clip_dim

    @property
    def text_width(self) -> int:
        return self.model.text_width

    def respaced_alphas_cumprod(self, steps: int) -> np.ndarray:
        """alphabar of the respaced chain, ascending, float64, as the original recomputes it (guided-diffusion
        ``SpacedDiffusion``): betas' = 1 - alphabar[t_i] / alphabar[t_(i-1)], then their cumulative product."""
        kept = self.alphas_cumprod[respaced_timesteps(steps, len(self.alphas_cumprod))]
        betas = 1 - kept / np.concatenate([[1.0], kept[:-1]])
        return np.cumprod(1.0 - betas, axis=0)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The respaced chain as a descending sigma grid, float64 (steps + 1,), ending in 0."""
        a = torch.as_tensor(self.respaced_alphas_cumprod(steps)[::-1].copy())
        return torch.cat([((1 - a) / a).sqrt(), a.new_zeros(1)])

    def denoiser(self) -> Callable[..., torch.Tensor]:
        """``D(x, sigma, cond) -> x0`` of the prior network (cond: a :meth:`TextPrefix.as_cond` dict)."""
        def net(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return self.model.step(x, t, TextPrefix.from_cond(dict(cond))).to(x.dtype)  # the float64 chain

        return Denoiser(net, torch.as_tensor(self.alphas_cumprod), "x0", "integer")


class ClampedGuidance:
    """Classifier-free guidance on the x0 prediction, then the clamp (the original's ``denoised_fn``). The
    original guides at every scale (it asserts scale > 0); at scale 1 the guided value is the conditional one,
    which :class:`CFGDenoiser` gives without the unconditional pass."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float, clamp: float) -> None:
        if not scale > 0:
            raise SdgenError(f"--prior-scale must be above 0 (the original asserts it), got {scale}")
        self.guided = CFGDenoiser(denoiser, scale)
        self.clamp = clamp

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        return self.guided(x, sigma, cond, **kwargs).clamp(-self.clamp, self.clamp)


def sample_prior(prior: KarloPrior, cond: TextPrefix, uncond: TextPrefix, noise: torch.Tensor, *, steps: int,
                 scale: float, noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 callback: Optional[Callable[[dict], Any]] = None) -> torch.Tensor:
    """Normalised image embeddings (B, D) float32 from unit noise (B, D) at the top of the respaced chain.

    ``cond`` / ``uncond`` are the rows' text prefixes (the prompt and the empty prompt); ``noise_sampler(sigma,
    sigma_next)`` gives each step's unit noise (B, D) (not drawn for the last step, whose noise the original
    multiplies by 0).

    The chain runs in float64 (the network in its own dtype): the first steps go from sigma 20,000 to 15, where a
    float32 DDIM step loses a tenth of its deterministic part to cancellation (sigma_next^2 - sigma_up^2).
    """
    sigmas = prior.sigmas(steps)
    guider = ClampedGuidance(prior.denoiser(), scale, prior.x0_clamp)
    extra = {"cond": {"cond": cond.as_cond(), "uncond": uncond.as_cond()}}
    x = sample_ddim(guider, initial_x(noise.double(), sigmas), sigmas, extra_args=extra, callback=callback,
                    noise_sampler=noise_sampler, eta=1.0)
    return x.float()  # the grid ends at sigma 0: the last step returns the clamped x0, in the VP = VE variable


def denormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised prior output (B, D) -> CLIP image embedding ``x std + mean`` (Karlo ``ViT-L-14_stats.th``)."""
    return x * std.reshape(1, -1).to(x) + mean.reshape(1, -1).to(x)


__all__ = ["KarloPrior", "ClampedGuidance", "X0_CLAMP", "denormalize", "respaced_timesteps", "sample_prior"]
