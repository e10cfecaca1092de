"""Explicit randomness: one CPU generator per image.

Image i of a run with seed s draws all its noise from ``torch.Generator("cpu").manual_seed(s + i)`` (the caller
passes the list of per-image seeds). The initial latent and every later ancestral draw of that image come from
its own stream, on the CPU, then move to the device: an image regenerates identically on its own, in any
batch, on any device. Nothing here touches the global RNG.

The SDE samplers (:data:`SDE_SAMPLERS`) instead take their noise from a Brownian motion per image
(:class:`BrownianTreeNoiseSampler`, seeded by the image's seed): the noise of a step is the normalised increment
of that one path, so a finer or coarser grid samples the same path. :func:`noise_sampler_for` picks the kind.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ldm.errors import SdgenError


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


#: Samplers whose noise between sigma and sigma' is a Brownian increment (:class:`BrownianTreeNoiseSampler`).
SDE_SAMPLERS = ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde")


def _grid_values(sigmas) -> list[float]:
    """All sigmas of a grid, or of several grids (a run's stages), as floats."""
    if isinstance(sigmas, torch.Tensor):
        return sigmas.detach().to("cpu", torch.float64).reshape(-1).tolist()
    return [v for grid in sigmas for v in _grid_values(grid)]


class BrownianTreeNoiseSampler:
    """``noise_sampler(sigma, sigma_next) -> (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``, (B, *shape).

    Image i has its own Brownian motion W_i with time t = sigma: a torchsde Brownian tree (float32, CPU, entropy
    = that image's seed, a 64-bit value: negative seeds taken mod 2^64) over [sigma_min, sigma_max] of the
    grid's nonzero sigmas. The tree resolves W at dyadic points of that interval down to ``tol`` (times are
    rounded to 1e-6), so the path does not depend on the order or spacing of the queries: any grid with the
    same sigma_min / sigma_max samples the same path, and image i of a batch gets the noise it gets alone.
    Each call returns unit-variance noise, stacked and moved to ``device`` / ``dtype``.

    Args:
        seeds: per-image seeds.
        shape: per-image shape (C, H, W).
        sigmas: the run's grid, or the grids of its stages (a list): the tree spans all their nonzero sigmas.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        sigmas,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tol: float = 1e-6,
    ) -> None:
        try:
            import torchsde
        except ImportError as exc:  # a declared dependency; only a broken install lacks it
            raise SdgenError("the SDE samplers need torchsde (pip install 'torchsde>=0.2.6')") from exc
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype
        positive = [v for v in _grid_values(sigmas) if v > 0]
        if not positive:
            raise SdgenError("a Brownian noise sampler needs a grid with a nonzero sigma")
        # the tree rounds its ends and the query times to the digits of tol: round the ends outwards
        scale = 10.0 ** -int(math.log10(tol))
        lo, hi = math.floor(min(positive) * scale) / scale, math.ceil(max(positive) * scale) / scale
        if hi <= lo:  # a single nonzero sigma: its one step goes to 0 and draws nothing
            hi = lo + 1.0
        self.t0, self.t1 = lo, hi
        self.trees = [
            torchsde.BrownianInterval(t0=lo, t1=hi, size=self.shape, dtype=torch.float32, device="cpu",
                                      entropy=int(seed) % 2**64, tol=tol, pool_size=24, halfway_tree=True)
            for seed in seeds
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if a == b:
            raise SdgenError(f"a Brownian increment needs two different sigmas, got {a} twice")
        lo, hi = max(min(a, b), self.t0), min(max(a, b), self.t1)
        increments = torch.stack([tree(lo, hi) for tree in self.trees])  # W(hi) - W(lo)
        scale = (1.0 if b > a else -1.0) / math.sqrt(abs(b - a))
        return (increments * scale).to(device=self.device, dtype=self.dtype)


def noise_sampler_for(
    sampler_name: str,
    seeds: Sequence[int],
    shape: Sequence[int],
    sigmas,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generators: Sequence[torch.Generator] | None = None,
):
    """The noise sampler of a run of ``sampler_name``: a :class:`BrownianTreeNoiseSampler` over ``sigmas`` (a grid
    or a list of the stages' grids) for the SDE samplers (:data:`SDE_SAMPLERS`), else a
    :class:`BatchedNoiseSampler` continuing ``generators`` (the streams the initial noise came from)."""
    if sampler_name in SDE_SAMPLERS:
        return BrownianTreeNoiseSampler(seeds, shape, sigmas, device=device, dtype=dtype)
    return BatchedNoiseSampler(seeds, shape, device=device, dtype=dtype, generators=generators)
