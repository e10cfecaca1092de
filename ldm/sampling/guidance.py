"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

A guider takes a denoiser ``D(x, sigma, cond) -> x0`` and is itself one, so every sampler gets guidance for
free. Guidance is applied to the denoised estimate, ``D = D_u + s (D_c - D_u)`` (SGM ``VanillaCFG``); since
D is affine in the network output for fixed (x, sigma), this equals CompVis's guidance on eps and SAI2's on v.

Extension point (Safe Latent Diffusion, :mod:`ldm.sampling.sld`): nonlinear guiders convert back to eps with
``eps = (x - x0) / sigma``. Per-step state (SLD warm-up, momentum) follows the *sampler step*, not the network
call: every sampler of :mod:`ldm.sampling.samplers` calls its ``callback`` exactly once per step, after all
denoiser evaluations of that step (2 for Heun and PLMS's first step), with ``info["i"]`` = the step index.
A stateful guider chains its step bookkeeping into that callback.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

DenoiserFn = Callable[..., torch.Tensor]


def cat_conds(conds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate cond dicts along the batch in list order (tensors on dim 0).

    Keys must agree; non-tensor values must be equal and are passed through (SGM ``VanillaCFG.prepare_inputs``).
    """
    keys = list(conds[0])
    for c in conds[1:]:
        if set(c) != set(keys):
            raise ValueError(f"cond dicts have different keys: {sorted(keys)} vs {sorted(c)}")
    out: dict[str, Any] = {}
    for k in keys:
        values = [c[k] for c in conds]
        if all(isinstance(v, torch.Tensor) for v in values):
            out[k] = torch.cat(values, dim=0)
        elif all(v == values[0] for v in values[1:]):
            out[k] = values[0]
        else:
            raise ValueError(f"cond entry {k!r} is not a tensor and differs between the branches")
    return out


class CFGDenoiser:
    """Classifier-free guidance around ``denoiser``.

    Called as ``guider(x, sigma, {"cond": dict, "uncond": dict})`` with x (B, C, H, W), sigma (B,): the
    network runs once on a batch of 2B, the unconditional half first (the order of every original), and the
    result is ``D_u + scale * (D_c - D_u)`` (B, C, H, W). With ``scale == 1`` only the conditional branch is
    evaluated (the originals skip the unconditional pass too). Extra keyword arguments go to ``denoiser``.
    """

    def __init__(self, denoiser: DenoiserFn, scale: float) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond["cond"], **kwargs)
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        x_in = torch.cat([x, x], dim=0)
        sigma_in = torch.cat([sigma, sigma], dim=0)
        cond_in = cat_conds([cond["uncond"], cond["cond"]])
        d_uncond, d_cond = self.denoiser(x_in, sigma_in, cond_in, **kwargs).chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


class CFGGuidance:
    """Plain classifier-free guidance as a guidance method of the generation loop: a :class:`CFGDenoiser` around
    each stage's denoiser, no conditioning besides "cond" and "uncond" (the interface
    :class:`ldm.sampling.sld.SLDGuidance` shares)."""

    def guider(self, denoiser: DenoiserFn, scale: float, previous: Any = None) -> CFGDenoiser:
        return CFGDenoiser(denoiser, scale)

    def extra_cond(self, encode: Callable[[list[str]], Mapping[str, Any]], batch_size: int, scale: float) -> dict:
        return {}

