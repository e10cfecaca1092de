"""Denoisers: a network predicting eps or v, wrapped as ``D(x, sigma, cond) -> x0``.

Every sampler sees a model only through this contract (Karras et al. 2022, "Elucidating the design space",
section 5): ``x`` is the VE sampler variable (B, C, H, W), ``sigma`` its noise level (B,), ``cond`` the
conditioning dict handed to the network, and the result the denoised estimate of the clean latent.

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * net(c_in(sigma) * x, t(sigma), cond)

The scalings (:class:`EpsScaling`, :class:`VScaling`, :class:`EDMScaling`, :class:`X0Scaling`) encode the
parameterization; the
time mode encodes what the network is told about the noise level, which is where the originals differ:

- ``"integer"``: sigma must lie on the training table; the network gets that integer t (CompVis DDIM/PLMS).
- ``"nearest"``: sigma is replaced by the table entry nearest in absolute difference and the network gets its
  integer index (SGM ``DiscreteDenoiser`` with ``quantize_c_noise``: SDXL).
- ``"interpolate"``: fractional t by linear interpolation in log sigma, sigma unchanged (k-diffusion
  ``DiscreteSchedule.sigma_to_t``).
- ``"continuous"``: fractional t of the CompVis DPM-Solver: the discrete VP schedule continued by linear
  interpolation of log alpha over t_n = (n + 1) / N, network time ``(t - 1/N) * 1000`` (float).
- ``"c_noise"``: the scaling's own c_noise (log(sigma) / 4 for EDM-trained networks), sigma unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.sampling.schedules import sigma_to_vp_time, sigmas_from_alphas_cumprod

NetFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]
TIME_MODES = ("integer", "nearest", "interpolate", "continuous", "c_noise")

# relative distance to the nearest table sigma accepted by time_mode="integer"
_INTEGER_RTOL = 1e-4


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class EpsScaling:
    """eps-prediction: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2 + 1), c_noise sigma (SGM denoiser_scaling.py).

    D = x - sigma * eps(x / sqrt(1 + sigma^2)): the network sees the VP variable x_t.
    """

    parameterization = "eps"

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        return c_skip, c_out, c_in, sigma.clone()


class VScaling:
    """v-prediction (Salimans & Ho 2022): c_skip 1/(sigma^2+1), c_out -sigma/sqrt(sigma^2+1), c_in 1/sqrt(sigma^2+1).

    Same as k-diffusion ``CompVisVDenoiser`` and SGM ``VScaling``; equals SAI2's
    x0 = sqrt(abar) x_t - sqrt(1 - abar) v.
    """

    parameterization = "v"

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / (sigma**2 + 1.0) ** 0.5
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        return c_skip, c_out, c_in, sigma.clone()


class EDMScaling:
    """EDM preconditioning (Karras et al. 2022, table 1) with data std ``sigma_data``; c_noise = log(sigma) / 4."""

    parameterization = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in, 0.25 * sigma.log()


class X0Scaling:
    """x0-prediction (the network predicts the clean sample, e.g. Karlo's prior, ``predict_xstart``): c_skip 0,
    c_out 1, c_in 1/sqrt(sigma^2 + 1), so D = net(x_t) with x_t the VP variable."""

    parameterization = "x0"

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, sigma.clone()


def make_scaling(parameterization: str) -> EpsScaling | VScaling | EDMScaling | X0Scaling:
    """Scaling object for ``"eps"``, ``"v"``, ``"edm"`` or ``"x0"``."""
    if parameterization == "eps":
        return EpsScaling()
    if parameterization == "v":
        return VScaling()
    if parameterization == "edm":
        return EDMScaling()
    if parameterization == "x0":
        return X0Scaling()
    raise SdgenError(f"unknown parameterization {parameterization!r} (eps, v, edm, x0)")


class Denoiser:
    """``D(x, sigma, cond) -> x0`` around ``net(x_in, t, cond) -> raw output`` (e.g. ``LatentDiffusion.apply_model``).

    Args:
        net: the network function; receives the scaled input, the time (B,) (int64 for the integer modes,
            float32 otherwise, float64 when sampling in float64) and ``cond`` unchanged.
        alphas_cumprod: the training alphabar (N,), e.g. the model's float32 buffer. Gives the sigma table
            sqrt((1 - a) / a) (computed in float64) unless ``sigmas`` is given.
        parameterization: ``"eps"`` or ``"v"`` (or ``"edm"``), or pass ``scaling``.
        time_mode: one of :data:`TIME_MODES` (see the module docstring).
        sigmas: an explicit ascending training sigma table (N,) (SGM's ``denoiser.sigmas`` buffer).

    Calling: ``x`` (B, C, H, W), ``sigma`` (B,) or scalar, ``cond`` any mapping; returns x0 (B, C, H, W) in
    ``x``'s dtype. Extra keyword arguments are accepted and ignored (guiders may pass bookkeeping).
    """

    def __init__(
        self,
        net: NetFn,
        alphas_cumprod: torch.Tensor | None = None,
        parameterization: str = "eps",
        time_mode: str = "interpolate",
        *,
        sigmas: torch.Tensor | None = None,
        scaling: Callable[[torch.Tensor], tuple] | None = None,
    ) -> None:
        if time_mode not in TIME_MODES:
            raise SdgenError(f"unknown time mode {time_mode!r} ({', '.join(TIME_MODES)})")
        if sigmas is None and alphas_cumprod is None:
            raise SdgenError("Denoiser needs alphas_cumprod or a sigma table")
        self.net = net
        self.time_mode = time_mode
        self.scaling = scaling if scaling is not None else make_scaling(parameterization)
        self.parameterization = getattr(self.scaling, "parameterization", parameterization)
        if sigmas is not None:
            self.sigmas = sigmas.detach().cpu()
            self.alphas_cumprod = 1.0 / (1.0 + self.sigmas.to(torch.float64) ** 2)
        else:
            self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().cpu()
            self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.log_sigmas = self.sigmas.to(torch.float64).log()
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_tables:
            self._device_tables[device] = (self.sigmas.to(device), self.log_sigmas.to(device))
        return self._device_tables[device]

    def sigma_to_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest table index by absolute sigma difference, compared in the table's dtype (SGM sigma_to_idx)."""
        table, _ = self._tables(sigma.device)
        dists = sigma.to(table.dtype)[None, :] - table[:, None]
        return dists.abs().argmin(dim=0)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional t by linear interpolation in log sigma (k-diffusion ``sigma_to_t``), float64."""
        _, log_sigmas = self._tables(sigma.device)
        log_sigma = sigma.to(torch.float64).log()
        dists = log_sigma[None, :] - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def time_and_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network time (B,), sigma used for the scalings (B,)) according to the time mode."""
        if self.time_mode in ("integer", "nearest"):
            idx = self.sigma_to_index(sigma)
            table, _ = self._tables(sigma.device)
            quantized = table[idx]
            if self.time_mode == "integer":
                rel = ((sigma.to(torch.float64) - quantized.to(torch.float64)).abs() / quantized.to(torch.float64))
                if bool((rel > _INTEGER_RTOL).any()):
                    raise SdgenError(
                        "time_mode 'integer' needs sigmas on the training table (the DDIM/PLMS grid); "
                        f"got {sigma.tolist()}"
                    )
            return idx, quantized.to(sigma.dtype)
        # fractional times in float32 (what the UNet's timestep embedding uses), float64 for float64 sampling
        t_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        if self.time_mode == "interpolate":
            return self.sigma_to_t(sigma).to(t_dtype), sigma
        if self.time_mode == "c_noise":
            return self.scaling(sigma)[3], sigma
        t_cont = sigma_to_vp_time(sigma.detach().cpu(), self.alphas_cumprod).to(sigma.device)
        n = self.num_timesteps
        return ((t_cont - 1.0 / n) * 1000.0).to(t_dtype), sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None, **_: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t, sigma = self.time_and_sigma(sigma)
        c_skip, c_out, c_in, _c_noise = (append_dims(c, x.ndim) for c in self.scaling(sigma))
        return self.net(x * c_in, t, cond) * c_out + x * c_skip


def _instantiate(config: Any) -> Any:
    from ldm.util import instantiate_from_config

    return instantiate_from_config(config)


class DiscreteDenoiser(nn.Module):
    """SGM ``DiscreteDenoiser`` as configured by the SDXL yamls (``denoiser_config``).

    Holds the ascending training sigma table as the buffer ``sigmas`` (checkpoint key ``denoiser.sigmas``),
    built from ``discretization_config`` with ``num_idx`` entries. ``forward(network, x, sigma, cond)`` is
    the SGM call (quantize sigma to the nearest table entry, integer c_noise); :meth:`bind` gives the
    sampler-facing :class:`Denoiser` for a network function. ``weighting_config`` (training only) is
    accepted and ignored.
    """

    def __init__(
        self,
        scaling_config: Mapping[str, Any],
        num_idx: int,
        discretization_config: Mapping[str, Any],
        weighting_config: Mapping[str, Any] | None = None,
        do_append_zero: bool = False,
        quantize_c_noise: bool = True,
        flip: bool = True,
    ) -> None:
        super().__init__()
        if not quantize_c_noise:
            raise SdgenError("DiscreteDenoiser with quantize_c_noise=False is not supported (SDXL uses True)")
        self.scaling = _instantiate(scaling_config)
        discretization = _instantiate(discretization_config)
        sigmas = discretization(num_idx, do_append_zero=do_append_zero, flip=flip)
        self.register_buffer("sigmas", sigmas)
        self.quantize_c_noise = quantize_c_noise

    def bind(self, net: NetFn) -> Denoiser:
        """``D(x, sigma, cond)`` for ``net(x_in, t, cond)`` with this table and scaling."""
        return Denoiser(net, sigmas=self.sigmas, time_mode="nearest", scaling=self.scaling)

    def forward(self, network: NetFn, x: torch.Tensor, sigma: torch.Tensor, cond: Any, **_: Any) -> torch.Tensor:
        return self.bind(network)(x, sigma, cond)
