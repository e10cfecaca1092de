"""The VAE posterior: a diagonal Gaussian over latents (CV ``ldm/modules/distributions/distributions.py``)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element.

    Args:
        parameters: (B, 2C, H, W): mean and log-variance concatenated on the channel axis.
        deterministic: if True, std and var are zero and ``sample()`` returns the mean.

    The log-variance is clamped to [-30, 20] as in the original, so ``std`` never under/overflows.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) (B, C, H, W).

        ``generator`` is one torch.Generator for the whole batch, or one per batch row (image i's noise then
        comes from generator i, independent of the batch size). The noise is drawn in float32 on the
        generator's device and then moved to the mean's device and dtype.
        """
        if self.deterministic:
            return self.mean
        if generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else self.mean.device
            eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        else:
            generators = list(generator)
            if len(generators) != self.mean.shape[0]:
                raise ValueError(f"{len(generators)} generators for a batch of {self.mean.shape[0]}")
            eps = torch.stack(
                [
                    torch.randn(self.mean.shape[1:], generator=g, device=g.device, dtype=torch.float32).to(
                        self.mean.device
                    )
                    for g in generators
                ]
            )
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W, per batch row (B,); against N(0, I) when other is None."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this distribution, summed over ``dims`` (nats)."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=sample.dtype, device=sample.device))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


def sample_latents(model: "object", posterior: DiagonalGaussianDistribution,
                   generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One sample of one image's ``posterior`` (batch 1) per generator, scaled as ``model.get_first_stage_encoding``
    scales it: (len(generators), C, h, w) float32; row i draws from ``generators[i]`` (img2img init latents, the
    inpainting masked-image and known-region latents)."""
    params = posterior.parameters.expand(len(generators), *posterior.parameters.shape[1:])
    return model.get_first_stage_encoding(type(posterior)(params), generator=list(generators)).float()
