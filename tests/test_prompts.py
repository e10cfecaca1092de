"""Prompts as AUTOMATIC1111 reads them, on every family's tiny text encoders: attention weights, BREAK, 75-token
chunks with the comma backtrack, clip skip, and the original scripts' conditioning one flag away."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.generation.generate import generate
from ldm.generation.request import Settings, make_jobs
from ldm.generation.stages import build_stages
from ldm.models.diffusion.engine import MicroConditioning
from ldm.modules.encoders.prompt_syntax import extract_lora_tags, parse_prompt_attention
from ldm.modules.encoders.prompts import TextOptions, chunk_prompt
from tests.conftest import REPO, randomized_state_dict

A1111 = TextOptions()
ORIGINAL = TextOptions(syntax="original")
FAMILIES = ("sd1-tiny", "sd2v-tiny", "sdxl-base-tiny", "sdxl-refiner-tiny")


@pytest.fixture(scope="module")
def models() -> dict:
    out = {}
    for name in FAMILIES:
        model = build_model_on_meta(load_config(REPO / "configs" / "tests" / f"{name}.yaml"))
        out[name] = assign_state_dict(model, randomized_state_dict(model, seed=4), source=name)
    return out


def conditioning(model, prompts: list[str], options: TextOptions | None) -> dict[str, torch.Tensor]:
    """The conditional branch of ``prompts`` ({"crossattn": (B, 77 k, D)[, "vector": (B, A)]})."""
    with torch.no_grad():
        if hasattr(model, "conditioner"):
            micro = MicroConditioning.for_image(32, 32)
            return dict(model.conditioner(model.conditioning_batch(prompts, micro, options=options)))
        return {"crossattn": model.get_learned_conditioning(prompts, options)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("text, expected", [
    ("a (b:1.5) [c]", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a [b] (c:2))", [("a ", 1.1), ("b", 1.1 / 1.1), (" ", 1.1), ("c", 2.2)]),
    (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("a: b", [("a: b", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a (b:0.5) BREAK c", [("a ", 1.0), ("b", 0.5), ("BREAK", -1.0), ("c", 1.0)]),  # BREAK eats its spaces
])
def test_attention_syntax_as_the_a1111_wiki_documents_it(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_lora_tags_are_found_and_leave_the_text():
    text, tags = extract_lora_tags("a cat <lora:styleA:0.7>, <lora:detail>")
    assert text == "a cat , "
    assert [(t.name, t.weight) for t in tags] == [("styleA", 0.7), ("detail", 1.0)]
    with pytest.raises(ValueError):
        extract_lora_tags("<lora:x:much>")


# ----------------------------------------------------------------------------- chunks


def test_chunks_of_75_with_the_comma_backtrack_and_break(models):
    encoder = models["sd1-tiny"].cond_stage_model
    red = encoder.word_ids("red")[0]
    comma = encoder.word_ids(",")[0]
    # 70 words, a comma, then 10 more: the chunk would split 5 tokens after the comma, so it breaks at the comma
    chunks = chunk_prompt(encoder, " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10), A1111)
    assert len(chunks) == 2 and all(len(c.tokens) == 77 for c in chunks)
    assert chunks[0].tokens[:73] == [encoder.id_start] + [red] * 70 + [comma, encoder.id_end]
    assert chunks[1].tokens[1:11] == encoder.word_ids(" ".join(["blue"] * 10))
    # no comma within 20 tokens of the end: a hard cut after 75 tokens
    chunks = chunk_prompt(encoder, "blue, " + " ".join(["red"] * 90), A1111)
    assert chunks[0].tokens[1:76] == encoder.word_ids("blue,") + [red] * 73
    # BREAK ends a chunk early; the rest is padded with EOS
    chunks = chunk_prompt(encoder, "red BREAK (blue:1.5)", A1111)
    assert len(chunks) == 2 and chunks[0].tokens[:3] == [encoder.id_start, red, encoder.id_end]
    assert chunks[1].tokens[1] == encoder.word_ids("blue")[0] and chunks[1].weights[1] == 1.5


@pytest.mark.parametrize("family", FAMILIES)
def test_short_plain_prompt_is_the_original_conditioning_bit_for_bit(models, family):
    model = models[family]
    prompts = ["a red cube on a table", ""]
    assert_same(conditioning(model, prompts, A1111), conditioning(model, prompts, ORIGINAL))
    assert_same(conditioning(model, prompts, TextOptions(clip_skip=1)), conditioning(model, prompts, None))


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_one_is_the_plain_word_and_other_weights_keep_the_mean(models, family):
    model = models[family]
    plain = conditioning(model, ["a red cube"], A1111)
    assert_same(conditioning(model, ["a (red:1.0) cube"], A1111), plain)
    weighted = conditioning(model, ["a (red:1.6) cube"], A1111)["crossattn"]
    assert not torch.equal(weighted, plain["crossattn"])
    torch.testing.assert_close(weighted.mean(), plain["crossattn"].mean(), rtol=1e-5, atol=1e-6)
    literal = conditioning(model, ["a (red:1.6) cube"], ORIGINAL)["crossattn"]  # brackets are words there
    assert not torch.equal(literal, weighted)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_prompts_are_chunked_and_the_original_mode_truncates(models, family):
    model = models[family]
    base = " ".join(["red"] * 80)
    a = conditioning(model, [base + " cube"], A1111)
    b = conditioning(model, [base + " sphere"], A1111)
    assert a["crossattn"].shape[1] == 154
    assert torch.equal(a["crossattn"][:, :77], b["crossattn"][:, :77])  # the first chunk does not see the end
    assert not torch.equal(a["crossattn"][:, 77:], b["crossattn"][:, 77:])
    if "vector" in a:  # SDXL's pooled text comes from the first chunk
        assert torch.equal(a["vector"], b["vector"])
        first = conditioning(model, [" ".join(["red"] * 75)], A1111)
        assert torch.equal(a["vector"], first["vector"])
    a0, b0 = conditioning(model, [base + " cube"], ORIGINAL), conditioning(model, [base + " sphere"], ORIGINAL)
    assert a0["crossattn"].shape[1] == 77
    assert_same(a0, b0)  # cut at 77 tokens: the last word is gone


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_skip_two_takes_an_earlier_layer(models, family):
    model = models[family]
    one = conditioning(model, ["a red cube"], TextOptions(clip_skip=1))["crossattn"]
    two = conditioning(model, ["a red cube"], TextOptions(clip_skip=2))["crossattn"]
    assert one.shape == two.shape and not torch.equal(one, two)


def sd1_images(model, prompt: str, syntax: str = "a1111", negative: str = "") -> list:
    settings = Settings(sampler="ddim", steps=4, grid="ddim", scale=7.5, height=16, width=16, factor=2,
                        precision="full", prompt_syntax=syntax)
    stages, _ = build_stages([("model", model)], settings)
    jobs = make_jobs([[prompt]], 1, 7, negative_prompt=negative)
    return [image.pixels for image in generate(stages, jobs, settings)]


def test_a_token_after_77_changes_the_image_and_the_negative_is_padded(tiny_model):
    words = " ".join(["red"] * 80)
    cube, sphere = sd1_images(tiny_model, words + " cube"), sd1_images(tiny_model, words + " sphere")
    assert (cube[0] != sphere[0]).any()
    # the original mode cuts both prompts at 77 tokens: the same image
    assert (sd1_images(tiny_model, words + " cube", "original")[0]
            == sd1_images(tiny_model, words + " sphere", "original")[0]).all()
    # a long negative prompt with a short prompt: both get two chunks
    assert sd1_images(tiny_model, "a cube", negative=words)[0].shape == (16, 16, 3)
    plain = sd1_images(tiny_model, "a red cube")
    assert (plain[0] == sd1_images(tiny_model, "a red cube", "original")[0]).all()
