"""MiDaS DPT-Hybrid of SD 2 depth-to-image (ldm.modules.midas) against the original code's golden vectors.

Golden README case 11 (the full-size network with random weights) and case 9 (a) / (g) (the depth conditioning
and the MiDaS input transform); tests/data/golden/README.md describes how they were made.

Tolerances (measured on an AMD EPYC, torch 2.14.1, timm 1.0.31, 1 and 2 threads):
* DPT forward: the golden output lies 7.1e-6 * max|depth| from a float64 run of the same weights, ours 5.6e-6;
  ours vs golden 8.7e-6 (2 threads) / 7.4e-6 (1 thread). Random N(0, 0.05^2) weights make depths up to ~200, so
  float32 rounding grows through the 12 ViT blocks and 4 fusion blocks to a size set by the largest values, not by
  each element: the bound is 3e-5 * max|recorded| (about twice the two float32 runs' measured errors added).
* Reassembled map sums: ours vs golden <= 3e-8 of the abs-sum, golden vs float64 <= 1e-7: bound 1e-6 * abs-sum.
* MiDaS input: OpenCV's INTER_CUBIC (the golden data) is within 2.4e-7 of the exact filter on [0, 1], ours within
  float32 rounding (6e-8); after the normalisation (x 2) ours vs golden measured 3.6e-7: bound 1e-6 per value, and
  for the two sums over all 258,048 values 258,048 * 1e-6 (measured 3.7e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from ldm.checkpoint import build_model_on_meta  # noqa: E402
from ldm.errors import SdgenError  # noqa: E402
from ldm.modules.midas.api import MiDaSInference  # noqa: E402
from ldm.modules.midas.transforms import (  # noqa: E402
    GET_INPUT_EPS,
    cubic_resize,
    depth_conditioning,
    depth_preview,
    midas_input,
    midas_input_size,
)
from tests.golden import (  # noqa: E402
    build_case_state_dict,
    case_data,
    manifest_sha256,
    released_manifest,
    state_dict_sha256,
)
from tests.tolerance import Tolerance, assert_matches_recorded, exact  # noqa: E402

CASE = "midas-dpt-hybrid"
TARGET = {"target": "ldm.modules.midas.api.MiDaSInference", "params": {"model_type": "dpt_hybrid"}}

DEPTH_TOL = Tolerance(
    why="float32 rounding of a 123M-parameter random-weight network whose depths reach ~200: measured 8.7e-6 * "
        "max|depth| here, each float32 run within 7.1e-6 * max of float64; bound 3e-5 * max", rel_max=3e-5)
MIDAS_IN_TOL = Tolerance(
    why="OpenCV INTER_CUBIC float32 (the recorded data) is within 2.4e-7 of the exact filter on [0, 1] and ours "
        "within float32 rounding; x 2 by the normalisation; measured 3.6e-7", abs=1e-6)
DEPTH_COND_TOL = Tolerance(
    why="torch float32 bicubic (a few ulps of values ~1..6, kernel choice per CPU) divided by the range (~5) "
        "and doubled; measured equal", abs=1e-6)


@pytest.fixture(scope="module")
def golden_weights() -> dict[str, torch.Tensor]:
    """Case 11's rebuilt state_dict: 368 entries, 123,146,985 numbers drawn from Generator(0) (0.5 GB)."""
    return build_case_state_dict(CASE)


@pytest.fixture(scope="module")
def golden_model(golden_weights) -> MiDaSInference:
    with torch.device("meta"):
        model = MiDaSInference("dpt_hybrid")
    model.load_state_dict(golden_weights, strict=True, assign=True)
    return model


@pytest.fixture(scope="module")
def meta_model() -> MiDaSInference:
    """Built as the checkpoint loader builds it: parameters on meta, nothing allocated."""
    return build_model_on_meta(TARGET)


def test_rebuilt_weights_match_the_manifest_hash(golden_weights):
    assert len(golden_weights) == 368
    assert sum(t.numel() for t in golden_weights.values()) == 123_146_985
    assert state_dict_sha256(golden_weights) == manifest_sha256(CASE)


def test_golden_depth_and_reassembled_maps(golden_model):
    data = case_data(CASE)
    x = data["x"]
    with torch.no_grad():
        maps = golden_model.model.forward_features(x)
        raw = golden_model.model(x)
    depth = golden_model(x)
    assert_matches_recorded(torch.tensor([list(m.shape) for m in maps]), data["reassembled.shapes"],
                            exact("integer shapes"), "reassembled shapes")
    sums = torch.tensor([[m.double().sum().item(), m.double().abs().sum().item()] for m in maps], dtype=torch.float64)
    recorded = data["reassembled.sum_abssum"]
    sum_tol = Tolerance(why="float32 rounding of the maps, summed in float64: measured 3e-8 of the abs-sum, "
                            "bound 1e-6 of it", abs=1e-6 * recorded[:, 1:].expand(-1, 2))
    assert_matches_recorded(sums, recorded, sum_tol, "reassembled sum / abs-sum")
    assert_matches_recorded(raw, data["raw_model_out"], DEPTH_TOL, "DPTDepthModel output")
    assert_matches_recorded(depth, data["depth"], DEPTH_TOL, "MiDaSInference depth")
    # same machine: the bicubic resize to the input's own size is an exact identity, and the final ReLU holds
    assert torch.equal(depth[:, 0], raw)
    assert float(depth.min()) == 0.0 and bool((depth == 0).any())


def test_state_dict_equals_the_released_depth_model_keys(meta_model):
    released = released_manifest("512-depth-ema")["keys"]
    expected = {k[len("depth_model."):]: shape for k, shape in released.items() if k.startswith("depth_model.")}
    ours = meta_model.state_dict()
    assert set(ours) == set(expected) and len(ours) == 368
    assert {k: list(v.shape) for k, v in ours.items()} == expected
    assert all(p.is_meta for p in meta_model.parameters()) and not list(meta_model.buffers())


def test_bad_model_type_and_bad_input_sizes(meta_model):
    with pytest.raises(SdgenError, match="dpt_large"):
        MiDaSInference("dpt_large")
    model = meta_model
    with pytest.raises(SdgenError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 64, device="meta"))
    with pytest.raises(SdgenError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 64, 64, device="meta"))


# ---- the input transform (golden case 9 g) -----------------------------------------------------------------------


def test_midas_input_size_examples():
    examples = case_data("sd2-depth")["midas.size_examples"]
    ours = torch.tensor([[h, w, *midas_input_size(h, w)] for h, w in examples[:, :2].tolist()])
    assert_matches_recorded(ours, examples, exact("integer sizes from float64 scale factors"), "Resize.get_size")
    # sides rounded half to even, as np.round: 48 / 32 = 1.5 -> 2 (64), 80 / 32 = 2.5 -> 2 (64, not 96)
    assert midas_input_size(48, 384) == (64, 384) and midas_input_size(80, 384) == (64, 384)
    with pytest.raises(SdgenError, match="elongated"):
        midas_input_size(10, 4000)


def test_midas_input_matches_the_original_transform():
    data = case_data("sd2-depth")
    u8 = data["midas.in_image_u8"]  # (24, 40, 3)
    image = (u8.to(torch.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]  # make_batch_sd: u8 / 127.5 - 1
    x = midas_input(image)
    assert list(x.shape[1:]) == data["midas.midas_in_shape"].tolist() and x.dtype == torch.float32
    assert_matches_recorded(x[0, :, ::8, ::8], data["midas.midas_in_sub8"], MIDAS_IN_TOL, "midas_in[:, ::8, ::8]")
    sums = torch.tensor([x.double().sum().item(), x.double().abs().sum().item()], dtype=torch.float64)
    sums_tol = Tolerance(why=f"{x.numel()} values each within {MIDAS_IN_TOL.abs} (per-value bound above)",
                         abs=x.numel() * MIDAS_IN_TOL.abs)
    assert_matches_recorded(sums, data["midas.midas_in_sums"], sums_tol, "midas_in sum / abs-sum")
    # a batch is transformed per image; an image already at the network size is not resampled
    pair = torch.cat([image, -image])
    assert torch.equal(midas_input(pair)[:1], x)
    square = torch.rand(1, 3, 384, 384) * 2 - 1
    assert torch.equal(midas_input(square), (((square + 1.0) * 0.5) - 0.5) / 0.5)
    with pytest.raises(SdgenError):
        midas_input(image[:, :1])


def test_cubic_resize_agrees_with_opencv():
    """Side check against OpenCV itself (not a dependency of sdgen): shrinking, enlarging, odd sizes."""
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(7)
    for (h, w), (nh, nw) in (((24, 40), (224, 384)), ((512, 768), (384, 576)), ((37, 501), (32, 416))):
        x = torch.rand(3, h, w, generator=g)
        ours = cubic_resize(x[None], (nh, nw))[0]
        ref = cv2.resize(x.permute(1, 2, 0).numpy(), (nw, nh), interpolation=cv2.INTER_CUBIC)
        assert ours.shape == (3, nh, nw)
        # measured 3.6e-7; OpenCV builds without IPP place their taps in float32 and differ by up to 2.5e-5
        assert np.abs(ours.permute(1, 2, 0).numpy() - ref).max() < 3e-5


# ---- depth post-processing (golden case 9 a) ----------------------------------------------------------------------


def test_depth_conditioning_script_and_get_input():
    data = case_data("sd2-depth")
    raw = data["depth.raw"]  # (1, 1, 40, 48), values 1..6
    script = depth_conditioning(raw, (16, 16))
    assert_matches_recorded(script, data["depth.cond_script"], DEPTH_COND_TOL, "script depth (no eps)")
    assert float(script.min()) == -1.0 and float(script.max()) == 1.0
    get_input = depth_conditioning(raw, (16, 16), eps=GET_INPUT_EPS)
    assert_matches_recorded(get_input, data["depth.cond_get_input"], DEPTH_COND_TOL, "get_input depth (eps 0.001)")
    assert float(get_input.max()) < 1.0
    # per sample: a batch of two differently scaled maps gives each its own [-1, 1]
    batch = depth_conditioning(torch.cat([raw, raw * 3 + 10]), (16, 16))
    assert torch.allclose(batch[1], batch[0], atol=1e-5) and torch.equal(batch[:1], script)
    # a constant map (0 / 0 in the original) gives -1, the eps > 0 limit
    flat = depth_conditioning(torch.full((1, 1, 8, 8), 2.0), (4, 4))
    assert torch.equal(flat, torch.full((1, 1, 4, 4), -1.0))


def test_depth_preview_as_the_gradio_script():
    raw = case_data("sd2-depth")["depth.raw"]
    two = torch.cat([raw, raw.flip(-1) * 2])
    preview = depth_preview(two)
    assert preview.dtype == torch.uint8 and preview.shape == (2, 40, 48)
    for i in range(2):  # the script's own steps on sample i (same machine: exact)
        cc = two[i:i + 1]
        lo, hi = torch.amin(cc, dim=[1, 2, 3], keepdim=True), torch.amax(cc, dim=[1, 2, 3], keepdim=True)
        expected = ((cc - lo) / (hi - lo))[0, 0].numpy() * 255.0
        assert np.array_equal(preview[i].numpy(), expected.astype(np.uint8))
    assert int(preview.min()) == 0 and int(preview.max()) == 255
    assert int(depth_preview(torch.ones(1, 1, 4, 4)).max()) == 0
