"""Full-size networks built on the meta device reproduce the released checkpoints' keys and shapes.

Hyperparameters are those of the reference inference configs, as summarised in
../shared/reference/checkpoints/README.md (v1-inference.yaml, v2-inference-v.yaml, v2-1-stable-unclip-*.yaml,
sd_xl_base.yaml, sd_xl_refiner.yaml). Plus small behavioural checks of the building blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.distributions import DiagonalGaussianDistribution
from tests.golden import released_manifest

V1 = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
    transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False,
)
V2 = dict(V1, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024, use_fp16=True)
UNCLIP_L = dict(V2, num_classes="sequential", adm_in_channels=1536)
UNCLIP_H = dict(V2, num_classes="sequential", adm_in_channels=2048)
XL_BASE = dict(
    adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
    model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)
XL_REFINER = dict(
    adm_in_channels=2560, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
    model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
    num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4, context_dim=[1280, 1280, 1280, 1280],
    spatial_transformer_attn_type="softmax-xformers", legacy=False,
)
VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0, attn_type="vanilla-xformers",
)

UNETS = {
    "sd-v1-4": V1,
    "v2-1_768-ema-pruned": V2,
    "sd21-unclip-l": UNCLIP_L,
    "sd21-unclip-h": UNCLIP_H,
    "sd_xl_base_0.9": XL_BASE,
    "sd_xl_refiner_0.9": XL_REFINER,
}


def _manifest_part(name: str, prefix: str) -> dict[str, list[int]]:
    keys = released_manifest(name)["keys"]
    return {k[len(prefix):]: list(v) for k, v in keys.items() if k.startswith(prefix)}


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", list(UNETS))
def test_full_size_unet_keys_and_shapes(name: str) -> None:
    with torch.device("meta"):
        unet = UNetModel(**UNETS[name])
    expected = _manifest_part(name, "model.diffusion_model.")
    got = _shapes(unet)
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert all(p.is_meta for p in unet.parameters())


@pytest.mark.parametrize("name", ["sd-v1-4", "sd_xl_base_0.9"])
def test_full_size_vae_keys_and_shapes(name: str) -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(
            ddconfig=VAE_DDCONFIG, embed_dim=4, monitor="val/rec_loss", lossconfig={"target": "torch.nn.Identity"}
        )
    assert _shapes(vae) == _manifest_part(name, "first_stage_model.")


def test_unet_head_layout() -> None:
    """num_heads fixes the head count (SD1); num_head_channels fixes the head width (SD2, SDXL)."""
    with torch.device("meta"):
        v1 = UNetModel(**V1)
        v2 = UNetModel(**V2)
    a1 = v1.input_blocks[1][1].transformer_blocks[0].attn1
    a2 = v2.output_blocks[3][1].transformer_blocks[0].attn2
    assert (a1.heads, a1.dim_head) == (8, 40)
    assert (a2.heads, a2.dim_head) == (20, 64)


def test_timestep_embedding_values() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    assert emb.dtype == torch.float32 and emb.shape == (3, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 1, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(timestep_embedding(t.double(), 8), emb)
    odd = timestep_embedding(torch.tensor([3.5]), 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0


def _einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3).double() for t in (q, k, v))
    w = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * d**-0.5, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", w, v).permute(0, 2, 1, 3).reshape(b, n, inner)


def test_cross_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    ref = attn.to_out(_einsum_attention(attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx), 2).float())
    torch.testing.assert_close(attn(x, ctx), ref, rtol=1e-5, atol=1e-6)
    self_attn = CrossAttention(16, heads=4, dim_head=4).eval()
    self_ref = self_attn.to_out(_einsum_attention(self_attn.to_q(x), self_attn.to_k(x), self_attn.to_v(x), 4).float())
    torch.testing.assert_close(self_attn(x), self_ref, rtol=1e-5, atol=1e-6)


def _sdpa_in_input_dtype(q, k, v, **kwargs):
    """SDPA's unfused math path as it runs on CUDA: q k^T and the softmax in the inputs' own dtype."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def test_half_precision_attention_does_not_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits beyond the float16 range (SD 2.x 768-v) must still give a finite, correct softmax.

    CPU SDPA already accumulates half inputs in float32, so the unfused CUDA path is simulated here.
    """
    attn = CrossAttention(8, heads=1, dim_head=8, context_dim=8)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            lin.weight.copy_(torch.eye(8) * 100.0)
        attn.to_out[0].weight.copy_(torch.eye(8))
        attn.to_out[0].bias.zero_()
    x = torch.full((1, 3, 8), 1.0)
    x[0, 1] = 2.0
    ref = attn(x, x)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_in_input_dtype)
    q16 = (x * 100.0).half()[:, None]
    assert not torch.isfinite(_sdpa_in_input_dtype(q16, q16, q16)).all()  # the scenario really overflows
    out16 = attn.half()(x.half(), x.half())
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16.float(), ref, rtol=1e-2, atol=1e-1)


def test_spatial_transformer_conv_and_linear_agree() -> None:
    """proj_in/out as 1x1 convs (SD1) and as Linear layers (SD2) compute the same map with the same weights."""
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=False).eval()
    lin = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True).eval()
    sd = conv.state_dict()
    for name in ("proj_in.weight", "proj_out.weight"):
        sd[name] = sd[name][:, :, 0, 0]
    sd["proj_out.weight"] = torch.randn_like(sd["proj_out.weight"]) * 0.1
    lin.load_state_dict(sd)
    conv.proj_out.weight.data.copy_(sd["proj_out.weight"][:, :, None, None])
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 6, 8)
    torch.testing.assert_close(conv(x, ctx), lin(x, ctx), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(conv(x, ctx), x)


def _tiny_unet(**extra) -> UNetModel:
    params = dict(
        in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
        channel_mult=[1, 2], num_head_channels=16, context_dim=8, use_linear_in_transformer=True,
    )
    params.update(extra)
    torch.manual_seed(0)
    unet = UNetModel(**params).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.05)
    return unet


def test_unet_timestep_forms_and_adm_conditioning() -> None:
    unet = _tiny_unet(num_classes="sequential", adm_in_channels=6)
    x, ctx, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8), torch.randn(2, 6)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 10]), context=ctx, y=y)
        assert out.shape == x.shape
        torch.testing.assert_close(unet(x, torch.tensor([10.0, 10.0]), context=ctx, y=y), out)
        torch.testing.assert_close(unet(x, torch.tensor(10), context=ctx, y=y), out)
        assert not torch.allclose(unet(x, torch.tensor([11, 11]), context=ctx, y=y), out)
        assert not torch.allclose(unet(x, torch.tensor([10, 10]), context=ctx, y=torch.zeros_like(y)), out)
    with pytest.raises(ValueError):
        unet(x, torch.tensor([10, 10]), context=ctx)


def test_unet_rows_are_independent() -> None:
    """Batching (as CFG does) does not change a row's result."""
    unet = _tiny_unet()
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 8)
    t = torch.tensor([999, 500, 1])
    with torch.no_grad():
        full = unet(x, t, context=ctx)
        single = unet(x[1:2], t[1:2], context=ctx[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-6)


def test_unet_without_context_uses_attention_blocks() -> None:
    unet = _tiny_unet(context_dim=None, num_heads=2, num_head_channels=-1, use_new_attention_order=True)
    keys = unet.state_dict().keys()
    assert "input_blocks.3.1.qkv.weight" in keys and not any("transformer_blocks" in k for k in keys)
    with torch.no_grad():
        assert unet(torch.randn(1, 4, 8, 8), torch.tensor([3])).shape == (1, 4, 8, 8)


def test_posterior_sampling_uses_the_generator() -> None:
    params = torch.cat([torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), 50.0)], dim=1)
    post = DiagonalGaussianDistribution(params)
    assert post.logvar.max().item() == 20.0  # clamped
    a = post.sample(generator=torch.Generator().manual_seed(1))
    b = post.sample(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    expected = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * math.exp(10.0)
    torch.testing.assert_close(a, expected)
    rows = post.sample(generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    torch.testing.assert_close(rows[1], torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(6)) * math.exp(10.0))
    assert torch.equal(post.mode(), post.mean)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_groupnorm32_in_bfloat16_computes_in_float32_without_float32_copies(memory_format):
    """bf16 GroupNorm32 on the CPU: the float32 computation rounded to bf16 (at most one bf16 step apart where
    the float32 sums are ordered differently; 99 % equal), and no dtype conversion of the activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ldm.modules.diffusionmodules.util import GroupNorm32

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(32, 320).to(torch.bfloat16)
    norm.weight.data.copy_(torch.rand(320, generator=g) + 0.5)
    norm.bias.data.copy_(torch.randn(320, generator=g))
    x = (torch.randn(2, 320, 16, 16, generator=g) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=memory_format)
    with Ops() as ops:
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert not [n for n in ops.names if "copy" in n], ops.names  # no _to_copy / copy_ of x or of the output
    want = torch.nn.functional.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    # one bf16 step at each value, plus an absolute floor for results near zero (x * scale + shift cancels there)
    assert ((got.float() - want).abs() <= want.abs() * 2.0 ** -7 + 2.0 ** -8).all()
    assert (got.float() == want.to(torch.bfloat16).float()).float().mean() > 0.99
