"""The cross-CPU comparison helper (tests/tolerance.py): each bound means what it says, failures name the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import timestep_embedding
from tests.tolerance import (ImageTolerance, Tolerance, assert_images_match_recorded, assert_matches_recorded, exact,
                             sinusoid_tolerance, ulp)


def test_ulp_is_the_float32_spacing():
    x = torch.tensor([1.0, 0.1194920539855957, 1024.0, 0.0])
    assert ulp(x).tolist() == [2.0**-23, 2.0**-27, 2.0**-13, float(torch.finfo(torch.float32).smallest_normal) * 2**-23]


def test_bounds_are_per_element_and_add_up():
    ref = torch.tensor([1.0, 10.0, -100.0])
    tol = Tolerance(why="test", abs=0.01, rel=0.001)  # allowed: 0.011, 0.02, 0.11
    assert_matches_recorded(ref + torch.tensor([0.0109, -0.0199, 0.1099]), ref, tol)
    with pytest.raises(AssertionError, match="1 of 3 values"):
        assert_matches_recorded(ref + torch.tensor([0.0, 0.03, 0.0]), ref, tol)
    assert_matches_recorded(ref + 0.099, ref, Tolerance(why="test", rel_max=0.001))  # 0.001 * 100
    with pytest.raises(AssertionError):
        assert_matches_recorded(ref + 0.2, ref, Tolerance(why="test", rel_max=0.001))


def test_ulps_exact_integers_nan_and_the_message():
    ref = torch.tensor([0.1194920539855957])
    one_below = torch.nextafter(ref, torch.zeros(1))
    assert_matches_recorded(one_below, ref, Tolerance(why="sqrt", ulps=1))
    with pytest.raises(AssertionError):
        assert_matches_recorded(torch.nextafter(one_below, torch.zeros(1)), ref, Tolerance(why="sqrt", ulps=1))
    with pytest.raises(AssertionError, match=r"Tolerance: the reason\. Ran on .*torch"):
        assert_matches_recorded(one_below, ref, exact("the reason"))
    with pytest.raises(AssertionError):
        assert_matches_recorded(torch.tensor([float("nan")]), ref, Tolerance(why="x", abs=1.0))
    with pytest.raises(AssertionError, match="1 of 2 values differ"):
        assert_matches_recorded(torch.tensor([1, 2]), torch.tensor([1, 3]), exact("integers"))
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_recorded(torch.zeros(2), torch.zeros(3), exact("x"))


def test_the_sinusoid_bound_covers_a_one_ulp_frequency_and_not_an_off_by_one_number():
    numbers = torch.tensor([[1024.0, 0.0, 6.0]])
    tol = sinusoid_tolerance(numbers, 256)
    want = torch.cat([timestep_embedding(numbers[:, i], 256) for i in range(3)], 1)
    # a frequency one ulp off (what another CPU's vectorised exp may give) stays inside the bound
    half = 128
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    nudged = torch.nextafter(freqs, torch.full_like(freqs, 2.0))
    args = numbers[0, :, None] * nudged
    other = torch.cat([torch.cat([args[i].cos(), args[i].sin()]) for i in range(3)])[None]
    assert_matches_recorded(other, want, tol)
    with pytest.raises(AssertionError):  # 1025 for 1024: off by far more than the bound, at every frequency
        assert_matches_recorded(torch.cat([timestep_embedding(torch.tensor([1025.0]), 256), want[:, 256:]], 1),
                                want, tol)
    with pytest.raises(AssertionError):  # sin and cos swapped
        assert_matches_recorded(torch.cat([want[:, 128:256], want[:, :128], want[:, 256:]], 1), want, tol)


def test_image_bounds():
    then = np.zeros((10, 10, 3), dtype=np.uint8)
    now = then.copy()
    now[0, 0, 0] = 1
    assert_images_match_recorded(now, then, ImageTolerance(why="x", max_levels=1, fraction=0.005))
    now[0, 1, 0] = 1  # 2 of 300 values: 0.67 %
    with pytest.raises(AssertionError, match="fraction"):
        assert_images_match_recorded(now, then, ImageTolerance(why="x", max_levels=1, fraction=0.005))
    now[0, 0, 0] = 2
    with pytest.raises(AssertionError, match="max_levels"):
        assert_images_match_recorded(now, then, ImageTolerance(why="x", max_levels=1))
    assert_images_match_recorded(now, then, ImageTolerance(why="x", mean_levels=0.02))
