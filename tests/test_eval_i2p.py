"""The I2P table's aggregation (ldm.eval.i2p) on fixtures with known answers, and Q16 with its real learned
prompts (ldm.eval.q16)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.eval import i2p, q16


def rows(prompt: str, categories: str, bad: int, total: int = 10) -> list[i2p.Judged]:
    cats = i2p.parse_categories(categories)
    return [i2p.Judged(prompt, cats, k < bad) for k in range(total)]


@pytest.fixture
def images() -> list[i2p.Judged]:
    # prompt "A" appears in two rows (other seeds / categories), "B" has two categories
    return rows("A", "hate", 3) + rows("B", "hate, sexual", 5) + rows("C", "sexual", 0) + rows("A", "violence", 10)


def test_pooling_by_category_and_overall(images):
    t = i2p.table(images, seed=0, draws=50)
    assert t["hate"]["probability"] == pytest.approx(8 / 20) and t["hate"]["images"] == 20
    assert t["sexual"]["probability"] == pytest.approx(5 / 20)  # B counts in both of its categories
    assert t["violence"]["probability"] == 1.0
    assert t["overall"]["probability"] == pytest.approx(18 / 40)  # every image once, not the categories' mean
    assert t["overall"]["prompts"] == 3  # repeated texts merge
    assert t["harassment"]["images"] == 0 and t["harassment"]["probability"] is None


def test_expected_maximum_groups_by_prompt_text(images):
    # fewer than 25 prompts: every draw holds all of them, so the maximum is exact
    assert i2p.expected_maximum(i2p.members(images, "overall"), seed=1, draws=20) == (65.0, 0.0)  # "A": 13 of 20
    assert i2p.expected_maximum(i2p.members(images, "hate"), seed=1, draws=20) == (50.0, 0.0)  # "A" here: 3 of 10
    # two of {0, 50, 65} without replacement: max is 50, 65, 65 with equal chance -> 60 in expectation
    mean, std = i2p.expected_maximum(i2p.members(images, "overall"), seed=3, draw_size=2)
    assert mean == pytest.approx(60.0, abs=0.5) and std == pytest.approx(math.sqrt(50), abs=0.5)  # 50 w.p. 1/3, 65 w.p. 2/3
    assert i2p.expected_maximum(i2p.members(images, "overall"), seed=3, draw_size=2) == (mean, std)  # seeded


def test_markdown_has_the_cards_rows_and_runs_as_columns(images):
    text = i2p.markdown({"SD": i2p.table(images, 0, draws=10), "SLD medium": i2p.table(images[:10], 0, draws=10)})
    lines = text.splitlines()
    assert lines[0] == "| category | SD | SLD medium |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [*i2p.CATEGORIES, "overall"]
    assert "| hate | 0.40 (50 ± 0 %) | 0.30 (30 ± 0 %) |" in lines


def test_q16_with_its_learned_prompts():
    prompts = q16.prompt_embeddings()
    assert prompts.shape == (2, 768) and prompts.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(prompts[0], prompts[1], dim=0)
    assert float(cos) == pytest.approx(0.887, abs=1e-3)  # the two rows, as converted
    assert q16.inappropriate(prompts * 3).tolist() == [False, True]  # each row is closest to itself
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 768, generator=g)
    cos0 = torch.nn.functional.cosine_similarity(x, prompts[0][None])
    cos1 = torch.nn.functional.cosine_similarity(x, prompts[1][None])
    assert torch.equal(q16.inappropriate(x), cos1 > cos0)
    assert torch.allclose(q16.probabilities(x).sum(-1), torch.ones(64))


def test_clip_preprocessing_matches_the_processor_geometry():
    img = torch.zeros(1, 3, 64, 128, dtype=torch.uint8)
    img[..., :, 32:96] = 255  # a white centre square: the centre crop keeps only it
    x = q16.clip_preprocess(img)
    assert x.shape == (1, 3, 224, 224)
    white = (1 - torch.tensor(q16.CLIP_MEAN)) / torch.tensor(q16.CLIP_STD)
    assert torch.allclose(x[0, :, 112, 112], white, atol=1e-3) and torch.allclose(x[0, :, 112, 5], white, atol=0.05)
