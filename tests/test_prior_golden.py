"""The Karlo prior against golden case 7 of the original code (tests/data/golden/README.md section 7).

The tiny prior (width 32, 2 layers, 2 heads, clip_dim 16) and tiny CLIP text tower are rebuilt with the golden
weights; tokens, text features, one network call, both 25-step samplings (scale 4, and 30000, which drives x0 into
the +-10 clamp) with every intermediate, the de-normalised output and the hand-off to the noise augmentor are
compared. The noise is the recorded one (injected: the original draws all of it from one global CUDA generator,
which no per-image stream can reproduce). Tolerances (tests/tolerance.py) are stated with what was measured.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from ldm.models.prior.karlo import KarloPrior, denormalize, respaced_timesteps, sample_prior
from ldm.models.prior.text import encode_text, karlo_tokens
from ldm.modules.encoders.image_embedders import CLIPEmbeddingNoiseAugmentation
from ldm.modules.encoders.modules import build_open_clip
from ldm.sampling.samplers import get_ancestral_step
from tests.golden import GOLDEN, adm_tolerance, case_data, case_state_dict, sub_state_dict
from tests.tolerance import IEEE_EXACT, NETWORK_FLOAT32, Tolerance, assert_matches_recorded

#: the prior network's float32 outputs here against the original's (outputs up to 0.12): measured 2.2e-8
NETWORK_ROUNDING = 4e-8


def sampling_tolerance(scale: float) -> Tolerance:
    """25 ancestral steps (float64 here, float32 VP in the original): 2e-6 of the largest value, plus what guidance
    makes of the network's float32 rounding: u + s (c - u) moves by up to (2 s + 1) times it, and each later
    state carries that on (coef1 <= 1). Measured (AMD EPYC, AVX2): scale 4, 4.5e-7 of the largest value; scale
    30000, 6.7e-4 (bound 2.4e-3). A timestep off by one, a missing clamp or sqrt(variance) in float32 are off by
    far more."""
    return Tolerance(why=f"prior sampling at guidance scale {scale:g}: float32 network rounding times 2 s + 1",
                     rel_max=2e-6, abs=(2 * scale + 1) * NETWORK_ROUNDING)


@pytest.fixture(scope="module")
def data():
    return case_data("karlo-prior")


@lru_cache(maxsize=None)
def golden_prior() -> KarloPrior:
    prior = KarloPrior(xf_width=32, xf_layers=2, xf_heads=2, clip_dim=16).eval()
    prior.load_state_dict(case_state_dict("karlo-prior"), strict=True)
    return prior


@lru_cache(maxsize=None)
def golden_clip():
    """The tiny OpenAI-CLIP text tower of the case, weights drawn as the README says (its own generator over its
    sorted keys; the text keys come before ``visual.*``, so drawing stops there)."""
    manifest = json.loads((GOLDEN / "karlo-clip.weights-manifest.json").read_text())
    clip = build_open_clip("ViT-L-14", {"embed_dim": 16, "quick_gelu": True,
                                        "text_cfg": {"width": 16, "heads": 2, "layers": 2, "context_length": 77,
                                                     "vocab_size": 49408}}, keep="text").eval()
    g = torch.Generator().manual_seed(0)
    weights = {}
    for entry in manifest["tensors"]:
        if entry["key"].startswith("visual."):
            break
        weights[entry["key"]] = torch.randn(entry["shape"], generator=g, dtype=torch.float32) * 0.05
    missing, unexpected = clip.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    return clip


def prompts() -> list[str]:
    return json.loads((GOLDEN / "karlo-prior.prompts.json").read_text())["prompts"]


def test_tokens_and_mask(data):
    ids, mask = karlo_tokens(prompts() + ["", ""])
    assert_matches_recorded(ids, data["text.tokens"], IEEE_EXACT)
    assert_matches_recorded(mask.long(), data["text.mask"], IEEE_EXACT)
    six = json.loads((GOLDEN / "tokenizer.prompts.json").read_text())
    ids, mask = karlo_tokens(six)
    assert_matches_recorded(ids, data["tokenizer.karlo_tokens"], IEEE_EXACT)
    assert_matches_recorded(mask.long(), data["tokenizer.karlo_mask"], IEEE_EXACT)
    ids, mask = karlo_tokens(["hi !$"])  # a real token with id 0: the mask counts tokens, not non-zero ids
    assert_matches_recorded(ids, data["tokenizer.zero_id_prompt_tokens"], IEEE_EXACT)
    assert_matches_recorded(mask.long(), data["tokenizer.zero_id_prompt_mask"], IEEE_EXACT)
    assert int(mask.sum()) == 5 and int((ids != 0).sum()) == 4


def test_text_tower_outputs(data):
    pooled, states = encode_text(golden_clip(), data["text.tokens"])
    assert_matches_recorded(states, data["text.txt_feat_seq"], NETWORK_FLOAT32, "token states")
    assert_matches_recorded(pooled, data["text.txt_feat"], NETWORK_FLOAT32, "pooled")


def test_one_network_call_and_the_text_prefix_cache(data):
    prior = golden_prior()
    mask = data["text.mask"].bool()
    with torch.no_grad():
        whole = prior.model(data["net.x"], data["net.t"], data["text.txt_feat"], data["text.txt_feat_seq"], mask)
        prefix = prior.model.encode_text(data["text.txt_feat"], data["text.txt_feat_seq"], mask)
        cached = prior.model.step(data["net.x"], data["net.t"], prefix)
        # the prefix does not depend on x or t: other inputs, same prefix, same as the whole computation again
        x2, t2 = torch.randn_like(data["net.x"]), torch.tensor([5, 700, 999, 0])
        whole2 = prior.model(x2, t2, data["text.txt_feat"], data["text.txt_feat_seq"], mask)
        cached2 = prior.model.step(x2, t2, prefix)
    assert_matches_recorded(whole, data["net.out"], NETWORK_FLOAT32, "81-token pass")
    assert_matches_recorded(cached, data["net.out"], NETWORK_FLOAT32, "cached pass")
    # on this machine the cached and the whole computation agree to float32 rounding (different kernel shapes)
    torch.testing.assert_close(cached, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached2, whole2, rtol=1e-5, atol=1e-7)
    # and padded text positions are really hidden: changing the states there changes nothing
    seq = data["text.txt_feat_seq"].clone()
    seq[~mask] = 7.0
    with torch.no_grad():
        padded = prior.model.step(data["net.x"], data["net.t"], prior.model.encode_text(data["text.txt_feat"], seq, mask))
    torch.testing.assert_close(padded, cached, rtol=1e-6, atol=1e-7)


def test_schedule_and_respacing(data):
    prior = golden_prior()
    assert_matches_recorded(torch.as_tensor(prior.alphas_cumprod), data["sched1000.alphas_cumprod"], IEEE_EXACT)
    t = respaced_timesteps(25)
    assert_matches_recorded(torch.as_tensor(t), data["sched25.timestep_map"], IEEE_EXACT)
    assert t[4] == 166 and t[12] == 500 and t[20] == 832  # Python's round half to even
    respaced = torch.as_tensor(prior.respaced_alphas_cumprod(25))
    assert_matches_recorded(respaced, data["sched25.alphas_cumprod"], IEEE_EXACT)
    sigmas = prior.sigmas(25)
    assert_matches_recorded(1 / (1 + sigmas[:-1].flip(0) ** 2), data["sched25.alphas_cumprod"],
                            Tolerance(why="float64 sqrt and square", rel=1e-14))


@pytest.mark.parametrize("case", ["s25", "c25"])
def test_25_step_sampling_every_intermediate(data, case):
    prior = golden_prior()
    b = 2
    mask = data["text.mask"].bool()
    with torch.no_grad():
        prefix = prior.model.encode_text(data["text.txt_feat"], data["text.txt_feat_seq"], mask)
    cond, uncond = prefix.select(torch.tensor([0, 1])), prefix.select(torch.tensor([2, 3]))
    noise_steps = iter(data[f"{case}.noise_steps"][:, :b])
    scale = float(data[f"{case}.scale"])
    SAMPLING = sampling_tolerance(scale)
    seen = {"t": [], "out": [], "x": [], "denoised": [], "std": []}
    denoiser = prior.denoiser()
    real_net = denoiser.net

    def net(x, t, c):
        out = real_net(x, t, c)
        seen["t"].append(t.clone())
        seen["out"].append(torch.cat([out[b:], out[:b]]))  # sdgen batches [uncond; cond], the original [cond; uncond]
        return out

    denoiser.net = net
    prior.denoiser = lambda: denoiser  # this instance's sampling records what the network sees

    def record(info):
        sigma, sigma_next = info["sigma"].double(), info["sigma_next"].double()
        seen["x"].append(info["x"].double() / (1 + sigma_next**2).sqrt())  # VE -> the original's VP state
        seen["denoised"].append(info["denoised"])
        _, up = get_ancestral_step(sigma, sigma_next, 1.0)
        seen["std"].append(up / (1 + sigma_next**2).sqrt())  # VE noise scale -> the posterior's std

    try:
        out = sample_prior(prior, cond, uncond, data[f"{case}.noise_init"][:b], steps=25,
                           scale=scale, noise_sampler=lambda s, sn: next(noise_steps),
                           callback=record)
    finally:
        del prior.denoiser
    assert [int(t[0]) for t in seen["t"]] == data[f"{case}.model_t"].tolist()
    assert all(bool((t == t[0]).all()) for t in seen["t"])
    assert_matches_recorded(torch.stack(seen["out"]), data[f"{case}.net_out"], NETWORK_FLOAT32, "network outputs")
    pred = data[f"{case}.pred_xstart"][:, :b]
    assert_matches_recorded(torch.stack(seen["denoised"]), pred, SAMPLING, "clamped guided x0")
    assert_matches_recorded(torch.stack(seen["x"]).float(), data[f"{case}.x_t"][1:, :b], SAMPLING, "states")
    std = torch.stack(seen["std"][:-1]).float()
    assert_matches_recorded(std, data[f"{case}.log_variance"][:-1].double().mul(0.5).exp().float(),
                            Tolerance(why="float64 vs float32 posterior variance", rel=1e-6), "step std")
    assert_matches_recorded(out, data[f"{case}.x_t"][-1, :b], SAMPLING, "final state")
    if case == "c25":  # the clamp is +-10 (diffusers' hub config clamps at 5)
        assert float(pred.abs().max()) == 10.0 and float(torch.stack(seen["denoised"]).abs().max()) == 10.0
    embedding = denormalize(out, data["stats.clip_mean"], data["stats.clip_std"])
    assert_matches_recorded(embedding, data[f"{case}.out"], SAMPLING, "de-normalised embedding")


def test_hand_off_to_the_noise_augmentor(data):
    aug = CLIPEmbeddingNoiseAugmentation({"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}, timestep_dim=16)
    aug.data_mean, aug.data_std = data["stats.clip_mean"].clone(), data["stats.clip_std"].clone()
    for level in (0, 200):
        noised, level_emb = aug(data["s25.out"], level, noise=data[f"handoff.level{level}.noise"])
        assert_matches_recorded(torch.cat([noised, level_emb], 1), data[f"handoff.level{level}.adm"],
                                adm_tolerance(level), f"level {level}")
    assert not data["handoff.adm_uc"].any()  # the unconditional branch's ADM is zeros, level half included


def test_full_size_config_has_the_released_keys_and_shapes():
    from ldm.checkpoint import build_model_on_meta, load_config

    model = build_model_on_meta(load_config("configs/karlo/prior_1B_vit_l.yaml"))
    released = json.loads((GOLDEN.parent / "manifests" / "karlo-prior.json").read_text())["keys"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: list(v) for k, v in released.items()}
    assert sum(v.numel() for v in model.state_dict().values()) == 1_022_028_544
