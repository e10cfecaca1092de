"""Explicit randomness: one CPU generator per image.

Image i of a run with seed s draws all its noise from ``torch.Generator("cpu").manual_seed(s + i)`` (the caller
passes the list of per-image seeds). The initial latent and every later ancestral draw of that image come from
its own stream, on the CPU, then move to the device: an image regenerates identically on its own, in any
batch, on any device. Nothing here touches the global RNG.
"""

from __future__ import annotations

from typing import Sequence

import torch


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, ``manual_seed(seed)``."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def image_seeds(seed: int, n: int) -> list[int]:
    """Per-image seeds ``seed, seed + 1, ..., seed + n - 1``."""
    return [seed + i for i in range(n)]


def _draw(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype) -> torch.Tensor:
    per_image = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(per_image).to(device=device, dtype=dtype)


def initial_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Unit Gaussian noise (B, *shape), image i drawn in float32 on the CPU from its own generator.

    ``shape`` is the per-image shape (C, H, W). Pass ``generators`` (from :func:`make_generators`) to keep
    drawing from the same streams afterwards (e.g. shared with a :class:`BatchedNoiseSampler`).
    """
    gens = make_generators(seeds) if generators is None else list(generators)
    if len(gens) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(gens)} generators")
    return _draw(shape, gens, device, dtype)


class BatchedNoiseSampler:
    """k-diffusion style ``noise_sampler(sigma, sigma_next) -> noise`` (B, *shape), per-image streams.

    Args:
        seeds: per-image seeds (used when ``generators`` is not given).
        shape: per-image shape (C, H, W).
        generators: continue these generators (pass the ones :func:`initial_noise` drew from).
        skip_initial: with fresh generators, first discard one ``shape`` draw per image, so the stream
            continues after the initial noise exactly as if the generators had been shared (the ancestral
            noise must not repeat the initial latent's).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generators: Sequence[torch.Generator] | None = None,
        skip_initial: bool = True,
    ) -> None:
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        if generators is None:
            self.generators = make_generators(seeds)
            if skip_initial:
                _draw(self.shape, self.generators, "cpu", torch.float32)
        else:
            self.generators = list(generators)

    def __call__(self, sigma: torch.Tensor | None = None, sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        return _draw(self.shape, self.generators, self.device, self.dtype)
