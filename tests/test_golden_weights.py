"""The golden weight regeneration reproduces the reference state_dicts bit for bit.

A comparison with data made on another CPU that stays exact: the weights are ``torch.randn`` draws from a seeded
CPU generator (Mersenne Twister and Box-Muller in torch's normal kernel, the same code path on every x86-64 CPU
with AVX2) and stored buffers; no floating-point reduction whose order a CPU could change is involved.
"""

import pytest

from tests.golden import CASES, case_state_dict, manifest_sha256, state_dict_sha256


@pytest.mark.parametrize("case", [c for c in CASES if c != "sd1"])
def test_rebuilt_state_dict_matches_manifest_hash(case):
    sd = case_state_dict(case)
    assert state_dict_sha256(sd) == manifest_sha256(case)
