"""Offline CLIP tokenization against the golden ids of the original code (golden README section 6)."""

import json
import logging

import pytest
import torch

from ldm.modules.encoders import tokenizer as tk
from tests.golden import GOLDEN, case_data
from tests.tolerance import IEEE_EXACT, assert_matches_recorded

PROMPTS = json.loads((GOLDEN / "tokenizer.prompts.json").read_text())
LONG = 3  # index of the prompt with 112 BPE tokens


@pytest.fixture(scope="module")
def golden():
    return case_data("tokenizer")


def test_hf_style_ids_equal_golden(golden):
    ids = tk.tokenize_hf(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (6, 77)
    assert_matches_recorded(ids, golden["hf_clip_input_ids"], IEEE_EXACT)


def test_generated_vocab_gives_transformers_tokenizer_as_sd1_calls_it(golden):
    tok = tk.hf_clip_tokenizer()
    enc = tok(PROMPTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert_matches_recorded(enc["input_ids"], golden["hf_clip_input_ids"], IEEE_EXACT)
    assert tok.bos_token_id == tk.BOS_ID and tok.eos_token_id == tk.EOS_ID and tok.pad_token_id == tk.EOS_ID


def test_vocab_layout():
    vocab, merges = tk.build_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0  # open_clip's pad id 0 is the "!" token
    assert sorted(vocab.values()) == list(range(49408))


def test_open_clip_style_ids_equal_golden(golden):
    ids = tk.tokenize_open_clip(PROMPTS)
    assert_matches_recorded(ids, golden["open_clip_tokens"], IEEE_EXACT)


def test_padding_and_truncation_layout(golden):
    hf, oc = tk.tokenize_hf(PROMPTS), tk.tokenize_open_clip(PROMPTS)
    # empty prompt: BOS, EOS, then the flavour's pad id
    assert hf[0, :2].tolist() == [49406, 49407] and set(hf[0, 2:].tolist()) == {49407}
    assert oc[0, :2].tolist() == [49406, 49407] and set(oc[0, 2:].tolist()) == {0}
    # truncated prompt: 75 tokens kept, EOS forced at the last position in both flavours
    assert hf[LONG, -1].item() == 49407 and oc[LONG, -1].item() == 49407
    assert torch.equal(hf[LONG], oc[LONG])
    # the flavours agree wherever open_clip is non-zero
    nz = oc != 0
    assert torch.equal(hf[nz], oc[nz])


@pytest.mark.parametrize("fn", [tk.tokenize_hf, tk.tokenize_open_clip])
def test_truncation_warns_once_naming_the_dropped_words(fn, caplog):
    long_prompt = PROMPTS[LONG]
    with caplog.at_level(logging.WARNING, logger=tk.__name__):
        fn([long_prompt, "a cat", long_prompt])
    records = [r for r in caplog.records if r.name == tk.__name__]
    assert len(records) == 1
    msg = records[0].getMessage()
    # 75 tokens are kept = 5 repetitions of 14 tokens + "a very long prompt about": the rest is dropped
    assert "1 prompt(s) truncated" in msg
    assert "'a beautiful landscape with mountains" in msg
    assert msg.rstrip("'").endswith("rivers and trees")
    assert msg.count("a very long prompt about") == 2  # the 2 whole repetitions after the cut


def test_short_prompts_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger=tk.__name__):
        tk.tokenize_hf(PROMPTS[:3] + PROMPTS[4:])
        tk.tokenize_open_clip("a photograph of an astronaut riding a horse")
    assert not [r for r in caplog.records if r.name == tk.__name__]


def test_single_string_is_a_batch_of_one():
    assert torch.equal(tk.tokenize_hf(PROMPTS[2]), tk.tokenize_hf([PROMPTS[2]]))
