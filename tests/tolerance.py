"""Comparisons with numbers made on another machine: the golden vectors of the original code
(tests/data/golden) and the recorded images of sdgen's commands (tests/data/regression).

Which floating-point kernel runs is the CPU's choice (AVX2, AVX-512, AMX): a sum blocked in another order, a
vectorised exp or sqrt that is one unit in the last place (ulp) off the correctly rounded value, a bf16 dot product
accumulated differently. Data made on one CPU is therefore reproduced on another only to within rounding. Every
comparison with such data goes through :func:`assert_matches_recorded` with a :class:`Tolerance` that states what
it allows and why; where the data is exact on every CPU (integers, float64 arithmetic cast once, IEEE-exact
operations) the tolerance is :func:`exact` and still says why. A failure names the CPU it ran on.

Comparisons made on one machine (an image alone vs in a batch, resumed vs uninterrupted, 1 vs N processes,
replay) are promises of bit-identity and never use this module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import torch

Bound = Union[float, torch.Tensor]


@lru_cache(maxsize=None)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, all flags) of this CPU from Linux ``/proc/cpuinfo`` (("unknown CPU", ()) elsewhere)."""
    model, flags = "unknown CPU", ()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = tuple(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_flags(prefixes: tuple[str, ...] = ("avx", "amx", "fma")) -> str:
    """The CPU's flags starting with ``prefixes``, sorted, space-separated (the vector units)."""
    return " ".join(sorted(f for f in cpu_info()[1] if f.startswith(prefixes)))


def cpu_description() -> str:
    """The CPU model and its vector-unit flags (what float results depend on beyond the torch build)."""
    return (f"{cpu_info()[0]} [{cpu_flags() or 'no AVX flags'}], torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at ``|values|`` (one unit in the last place), float64, same shape."""
    v = values.detach().to(torch.float32).abs()
    return (torch.nextafter(v, torch.tensor(math.inf)) - v).to(torch.float64)


@dataclass(frozen=True)
class Tolerance:
    """How far a value computed here may lie from one recorded on another CPU, per element:

    ``|actual - recorded| <= abs + rel * |recorded| + rel_max * max|recorded| + ulps * ulp(recorded)``

    ``abs`` may be a tensor (one bound per element). ``why`` says where the difference comes from and why the
    bound is what it is (the float32 rounding of the operation, its amplification through steps, bf16 steps).
    """

    why: str
    abs: Bound = 0.0
    rel: float = 0.0
    rel_max: float = 0.0
    ulps: float = 0.0

    def allowed(self, recorded: torch.Tensor) -> torch.Tensor:
        ref = recorded.detach().to(torch.float64)
        bound = torch.as_tensor(self.abs, dtype=torch.float64) + self.rel * ref.abs()
        if self.rel_max:
            bound = bound + self.rel_max * float(ref.abs().max()) if ref.numel() else bound
        if self.ulps:
            bound = bound + self.ulps * ulp(recorded)
        return bound.expand(ref.shape)


def exact(why: str) -> Tolerance:
    """No difference allowed: ``why`` says what makes the value the same on every CPU."""
    return Tolerance(why=why)


def assert_matches_recorded(actual: torch.Tensor, recorded: torch.Tensor, tolerance: Tolerance,
                            what: str = "") -> None:
    """Assert ``actual`` (computed here) is within ``tolerance`` of ``recorded`` (made on another machine)."""
    actual, recorded = torch.as_tensor(actual), torch.as_tensor(recorded)
    label = f"{what}: " if what else ""
    assert actual.shape == recorded.shape, f"{label}shape {tuple(actual.shape)} != recorded {tuple(recorded.shape)}"
    if not (actual.is_floating_point() or recorded.is_floating_point()):
        different = int((actual != recorded).sum())
        assert different == 0, f"{label}{different} of {actual.numel()} values differ ({tolerance.why})"
        return
    diff = (actual.detach().to(torch.float64) - recorded.detach().to(torch.float64)).abs()
    allowed = tolerance.allowed(recorded)
    over = ~(diff <= allowed)  # NaN counts as over
    _report(what, tolerance, diff, allowed, recorded)
    if bool(over.any()):
        worst = int(torch.argmax(torch.where(over, diff - allowed, torch.zeros_like(diff)).flatten()))
        raise AssertionError(
            f"{label}{int(over.sum())} of {diff.numel()} values outside the tolerance; worst at flat index {worst}: "
            f"{float(actual.flatten()[worst])!r} vs recorded {float(recorded.flatten()[worst])!r} (difference "
            f"{float(diff.flatten()[worst]):.3g}, allowed {float(allowed.flatten()[worst]):.3g}). Tolerance: "
            f"{tolerance.why}. Ran on {cpu_description()}.")


def _report(what: str, tolerance: Tolerance, diff: torch.Tensor, allowed: torch.Tensor,
            recorded: torch.Tensor) -> None:
    """With ``SDGEN_TOLERANCE_REPORT=FILE``, append how close this comparison came to its bound (a tab-separated
    line: test, what, max difference, max difference / max |recorded|, largest used fraction of the bound; for
    images: max, fraction and mean of the differences) -- how the bounds in the tests are measured on a new CPU."""
    path = os.environ.get("SDGEN_TOLERANCE_REPORT")
    if not path or diff.numel() == 0:
        return
    scale = float(recorded.detach().abs().max()) or 1.0
    used = torch.where(allowed > 0, diff / allowed, torch.where(diff > 0, math.inf, 0.0))
    _report_line(what, {"max": float(diff.max()), "max/scale": float(diff.max()) / scale,
                        "bound used": float(used.max())}, tolerance.why)


def _report_line(what: str, measured: dict[str, float], why: str) -> None:
    path = os.environ.get("SDGEN_TOLERANCE_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    numbers = "\t".join(f"{name} {value:.3g}" for name, value in measured.items())
    with open(path, "a") as handle:
        handle.write(f"{test}\t{what}\t{numbers}\t{why}\n")


def sinusoid_tolerance(numbers: torch.Tensor, dim: int, max_period: float = 10000.0) -> Tolerance:
    """Tolerance for ``[cos(n f) | sin(n f)]`` embeddings of ``numbers`` (B, N) -> (B, N * dim), each number's
    block of ``dim`` (frequencies ``f_i = exp(-ln(max_period) i / (dim/2))``, float32) side by side.

    The float32 argument ``n * f_i`` inherits the vectorised exp's error in ``f_i`` (up to 1 ulp, CPU-dependent):
    up to ``|n| ulp(f_i) <= 2 ulp(n f_i)`` in the argument, which sin / cos pass on unchanged in size. Their own
    rounding adds up to 1 ulp of a number of size 1 each. Bound: ``2 ulp(n f_i) + 2 ulp(1)`` per element
    (measured on AMD EPYC AVX2 vs the recording AMX CPU: 3.0e-5 at an argument of 431, where the bound is 6.1e-5).
    A swapped sin / cos, a number off by one or a wrong period is off by far more (down to ~1e-4 at the lowest
    frequency, where the bound is ~2.6e-7).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = numbers.to(torch.float64)[..., None] * freqs  # (B, N, half)
    per_number = 2 * ulp(args) + 2 * ulp(torch.ones(()))
    bound = torch.cat([per_number, per_number], dim=-1).flatten(-2)  # cos half, sin half for each number
    return Tolerance(why="float32 sinusoidal embedding: 1-ulp exp / sin / cos differences between CPUs, "
                         "amplified by the size of the argument (2 ulp(argument) + 2 ulp(1))", abs=bound)


@dataclass(frozen=True)
class ImageTolerance:
    """How far 8-bit images rendered here may lie from images recorded on another CPU: at most ``max_levels`` in
    any value, at most a ``fraction`` of the values different at all, and a mean difference of at most
    ``mean_levels`` (None: that measure is not bounded). ``why`` says where the difference comes from."""

    why: str
    max_levels: float | None = None
    fraction: float | None = None
    mean_levels: float | None = None


def assert_images_match_recorded(now, then, tolerance: ImageTolerance, what: str = "") -> None:
    """Assert the uint8 image ``now`` (rendered here) is within ``tolerance`` of ``then`` (recorded elsewhere)."""
    import numpy as np

    label = f"{what}: " if what else ""
    assert now.shape == then.shape, f"{label}shape {now.shape} != recorded {then.shape}"
    diff = np.abs(np.asarray(now, dtype=np.int64) - np.asarray(then, dtype=np.int64))
    measured = {"max_levels": float(diff.max()), "fraction": float((diff > 0).mean()), "mean_levels": float(diff.mean())}
    _report_line(what, measured, tolerance.why)
    over = [f"{name} {value:.4g} > {getattr(tolerance, name)}" for name, value in measured.items()
            if getattr(tolerance, name) is not None and value > getattr(tolerance, name)]
    assert not over, (f"{label}{', '.join(over)} (max {measured['max_levels']:.0f} levels, "
                      f"{measured['fraction']:.3%} of the values differ, mean {measured['mean_levels']:.3g} levels). "
                      f"Tolerance: {tolerance.why}. Ran on {cpu_description()}.")


# Named tolerances shared by several test files -------------------------------------------------------------------

#: SGM sigmas ``float32((1 - a) / a) ** 0.5``: the ratio is float64 (exact everywhere), the square root float32,
#: and torch's vectorised float32 sqrt is not correctly rounded on every CPU (AMD EPYC, AVX2 build: 174 of the 1000
#: table entries one ulp below the recording AMX CPU's). A grid from the wrong timesteps is off by percents.
SGM_SIGMAS = Tolerance(why="float32 sqrt, correctly rounded on some CPUs and 1 ulp off on others", ulps=1)

#: The cosine schedule (``squaredcos_cap_v2``) goes through libm's float64 cos, whose implementation glibc picks by
#: CPU (an FMA or an SSE2 variant, last bits may differ); cast to float32 that is at most 1 ulp.
COSINE_SCHEDULE = Tolerance(why="float64 libm cos (glibc picks its variant by CPU) cast to float32", ulps=1)

#: One float32 forward pass of a tiny network (UNet, VAE, text tower, ~20 layers): convolution and matmul sums are
#: blocked per CPU and thread count, a few ulps per operation. Measured at most ~1e-6 relative on the recording CPU
#: and on AMD EPYC (AVX2); a wrong activation, scale or layer order is off by 1e-2 or more.
NETWORK_FLOAT32 = Tolerance(why="one float32 forward pass of a tiny network: kernel summation order per CPU",
                            rel=1e-5, abs=1e-6)

#: float64 arithmetic cast once to float32, integer indexing, IEEE-exact float32 operations: the same bits on
#: every CPU (the golden README: schedule buffers, timesteps, token ids).
IEEE_EXACT = exact("float64 schedule arithmetic cast once to float32, integers or IEEE-exact operations")


__all__ = ["COSINE_SCHEDULE", "IEEE_EXACT", "ImageTolerance", "NETWORK_FLOAT32", "cpu_flags", "cpu_info", "SGM_SIGMAS", "Tolerance", "assert_images_match_recorded",
           "assert_matches_recorded", "cpu_description", "exact", "sinusoid_tolerance", "ulp"]
