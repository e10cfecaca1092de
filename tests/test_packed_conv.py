"""Packed convolutions (ldm/modules/packed_conv.py): the same convolution as nn.Conv2d (bf16 identical, float32
within 1e-5 relative), the dense weight released and given back exactly, edits noticed, autocast kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.generation import inference
from ldm.modules import packed_conv
from ldm.modules.packed_conv import (PackedConv2d, bf16_packing_available, pack_convolutions, packing_available,
                                     unpack_convolutions)
from tests.test_inference import tiny

pytestmark = pytest.mark.skipif(not packing_available(), reason="this PyTorch build has no oneDNN")

FLOAT32_RELATIVE = 1e-5  # issue bound for float32 against the eager kernels


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def conv_pair(channels: int, seed: int) -> tuple[nn.Conv2d, PackedConv2d]:
    """A seeded 3x3 convolution and a packed copy of it."""
    torch.manual_seed(seed)
    eager = nn.Conv2d(channels, channels, 3, padding=1)
    return eager, PackedConv2d.convert(copy.deepcopy(eager))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_the_packed_convolution_is_the_convolution(dtype, layout, kernel, stride):
    torch.manual_seed(0)
    eager = nn.Conv2d(24, 40, kernel, stride=stride, padding=kernel // 2).to(dtype)
    packed = PackedConv2d.convert(copy.deepcopy(eager))
    with torch.no_grad():
        # packed for the first shape; later shapes (other sizes, batch) run on the same packed weight
        for shape in ((2, 24, 16, 16), (1, 24, 9, 13), (3, 24, 32, 8)):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
            want, got = eager(x), packed(x)
            assert got.dtype == want.dtype and got.shape == want.shape
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                assert relative(got, want) < FLOAT32_RELATIVE
    if dtype == torch.bfloat16 and not bf16_packing_available():  # an AVX2-only CPU: bf16 stays eager
        assert packed._packed is None and torch.equal(packed.weight, eager.weight)
        return
    assert packed.weight.numel() == 0  # the packed weight replaced the dense one: no extra memory
    assert torch.equal(packed.state_dict()["weight"], eager.weight)
    packed.unpack()
    assert torch.equal(packed.weight, eager.weight)


def test_an_edit_of_the_weight_is_noticed():
    eager, packed = conv_pair(8, seed=1)
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        packed(x)
        unpack_convolutions(nn.Sequential(packed))  # before editing in place
        packed.weight.mul_(-2.0)
        eager.weight.mul_(-2.0)
        assert relative(packed(x), eager(x)) < FLOAT32_RELATIVE
        packed.weight = nn.Parameter(torch.zeros_like(eager.weight))  # a new Parameter: repacked
        assert packed(x).sub(packed.bias[:, None, None]).abs().max() == 0


def test_autocast_packs_a_bf16_copy_and_keeps_the_float32_weight():
    eager, packed = conv_pair(16, seed=2)
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = eager(x), packed(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        assert torch.equal(packed.weight, eager.weight)  # float32 weight kept for float32 calls
        assert relative(packed(x), eager(x)) < FLOAT32_RELATIVE
        with torch.autocast("cpu", dtype=torch.bfloat16):  # and back: the float32 values are still there
            assert torch.equal(packed(x), eager(x))


def test_a_packed_convolution_converted_afterwards_still_computes():
    """``.to()`` after packing converts the released (empty) weight; the next call the packed kernel cannot
    serve (float64 here, a GPU in an offloaded run) unpacks onto the weight's dtype and device and runs eagerly."""
    eager, packed = conv_pair(6, seed=3)
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        packed(x)
        assert packed.weight.numel() == 0
        packed.to(torch.float64)
        eager.to(torch.float64)
        got = packed(x.double())
        assert got.dtype == torch.float64 and torch.equal(got, eager(x.double()))
        assert torch.equal(packed.weight, eager.weight)


def test_without_the_bf16_path_bf16_calls_are_eager_and_float32_calls_packed(monkeypatch):
    """oneDNN reorders bf16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere a bf16 call
    (bf16 weights, or autocast) is the eager convolution, and float32 calls are still packed."""
    monkeypatch.setattr(packed_conv, "bf16_packing_available", lambda: False)
    eager, packed = conv_pair(8, seed=4)
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(packed(x), eager(x))
        assert packed._packed is None and torch.equal(packed.weight, eager.weight)
        packed.to(torch.bfloat16)
        eager.to(torch.bfloat16)
        assert torch.equal(packed(x.bfloat16()), eager(x.bfloat16())) and packed._packed is None
        packed.float()
        eager.float()
        assert relative(packed(x), eager(x)) < FLOAT32_RELATIVE and packed._packed is not None


def test_without_the_kernel_nothing_changes(monkeypatch):
    monkeypatch.setattr(packed_conv, "packing_available", lambda: False)
    net = nn.Sequential(nn.Conv2d(3, 3, 1))
    assert pack_convolutions(net) == 0 and type(net[0]) is nn.Conv2d


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_a_prepared_unet_and_vae_match_the_eager_ones(precision):
    model = tiny("sd1-tiny")
    eager = copy.deepcopy(model)
    inference.prepare_for_inference(eager, precision, torch.device("cpu"), pack=False)
    inference.prepare_for_inference(model, precision, torch.device("cpu"))
    unet = model.model.diffusion_model
    assert any(isinstance(m, PackedConv2d) for m in unet.modules())
    assert not any(isinstance(m, PackedConv2d) for m in eager.modules())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        got, want = unet(x, t, context=ctx), eager.model.diffusion_model(x, t, context=ctx)
        image, image_eager = model.decode_first_stage(x[:1]), eager.decode_first_stage(x[:1])
    if dtype is None:
        assert relative(got, want) < FLOAT32_RELATIVE and relative(image, image_eager) < FLOAT32_RELATIVE
    else:
        assert torch.equal(got, want) and torch.equal(image, image_eager)
