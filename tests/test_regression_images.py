"""Changing structure must not change pixels: every recorded command (tests/regression_images.py) gives the
recorded images again.

On the platform they were recorded on (the same torch build, CPU vector units and thread count:
tests/data/regression/platform.json) they must be equal bit for bit. Elsewhere the float kernels round
differently (another vector width, another summation order), so the comparison goes through tests/tolerance.py
with a bound per kind of case, stated below with what was measured on a CPU other than the recording one (AMD EPYC,
AVX2 only, 1 thread, against the AMX recording). The session header (tests/conftest.py) says which comparison
applies on this machine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.regression_images import CASES, RECORDED, platform_key, recorded, run_case
from tests.tolerance import ImageTolerance, assert_images_match_recorded

SAME_PLATFORM = json.loads((RECORDED / "platform.json").read_text()) == platform_key()

#: float32 runs: a last-bit difference moves an 8-bit value only where it sits on a rounding boundary.
#: Measured: at most 1 level on at most 0.23 % of the values (unclip-h-prompt), most cases under 0.05 %.
FLOAT32 = ImageTolerance(why="float32 kernels of another CPU: 1 level where a value sits on a rounding boundary",
                         max_levels=1, fraction=0.005)
#: Safe Latent Diffusion thresholds |eps_prompt - eps_concept| per element (SLD eq. 6, a step function): a last-bit
#: difference can flip one element's mask and move its guidance by the SLD scale, so such cases move more values.
#: Measured on demo-sld-max-plms ("max": threshold 1.0, guidance 5000): 2 levels at most, 2.2 % of the values.
SLD_THRESHOLD = ImageTolerance(why="SLD's per-element threshold turns last-bit differences into whole-step ones",
                               max_levels=2, fraction=0.05)
#: bf16 runs: on its tiny random weights this case's bf16 image lies a mean of 5.9 levels from its float32 image on
#: every CPU measured (5.86 on the AMX recording CPU, 5.87 on AMD EPYC AVX2, where bf16 convolutions run eagerly),
#: and the float32 images agree to 1 level, so two CPUs' bf16 images lie within 2 x 5.9 + 1 = 13 levels in the
#: mean. Measured: 7.05. This is a coarse check (it catches a wrong seed, 84 levels, or swapped guidance branches,
#: 45, not a timestep off by one, 8): the float32 cases catch those, and tests/test_inference.py holds bf16 to
#: float32 on the machine itself; the recording CPU compares this image bit for bit.
BF16 = ImageTolerance(why="bf16 steps: each CPU's bf16 image lies ~5.9 levels (mean) from its float32 one",
                      mean_levels=13)
ELSEWHERE = {"demo-sld-max-plms": SLD_THRESHOLD, "sd1-bf16": BF16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, hash_cache_dir):
    return tmp_path_factory.mktemp("regression")


@pytest.mark.parametrize("name", list(CASES))
def test_recorded_images_are_reproduced(name, folder):
    now, then = run_case(name, folder), recorded(name)
    assert now.shape == then.shape, (now.shape, then.shape)
    if SAME_PLATFORM:
        different = int((now != then).sum())
        assert different == 0, (f"{name} (recording platform: compared bit for bit): {different} of {now.size} "
                                "values differ from the recorded images")
    else:
        assert_images_match_recorded(now, then, ELSEWHERE.get(name, FLOAT32),
                                     f"{name} (recorded on another platform: within the cross-CPU bound)")


def test_the_cross_cpu_bounds_still_catch_a_changed_image(folder):
    """The bounds used elsewhere are far below what a real change does: the same command with one more step."""
    name = "demo-ddim"
    changed = run_case(name, folder, extra=["--steps", "11"])
    for tolerance in (FLOAT32, SLD_THRESHOLD):
        with pytest.raises(AssertionError):
            assert_images_match_recorded(changed, recorded(name), tolerance)
    diff = np.abs(changed.astype(int) - recorded(name).astype(int))
    assert diff.mean() > 1
