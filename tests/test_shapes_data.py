"""The procedural shapes data set and the pixel classifier of the quality check (ldm.demo.shapes, ldm.demo.quality)."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.demo.shapes import COLORS, SHAPES, SIZES, ShapesDataModule, ShapesDataset, ShapeSpec, caption_for, render
from ldm.errors import SdgenError
from ldm.demo.quality import classify, nearest_color, prompt_target, shape_from_features


def as_uint8(item: dict) -> np.ndarray:
    return ((item["image"] + 1.0) * 127.5).round().astype(np.uint8)


def test_items_are_deterministic_and_well_formed():
    a, b = ShapesDataset(length=50, seed=3), ShapesDataset(length=50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["image"].shape == (64, 64, 3) and x["image"].dtype == np.float32
        assert -1.0 <= x["image"].min() and x["image"].max() <= 1.0
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"]
    other = ShapesDataset(length=50, seed=4)
    assert any(not np.array_equal(a[i]["image"], other[i]["image"]) for i in range(5))
    with pytest.raises(IndexError):
        a[50]


def test_vocabulary_and_captions_cover_the_issue():
    assert set(SHAPES) >= {"circle", "square", "triangle"} and len(COLORS) >= 6 and len(SIZES) == 2
    ds = ShapesDataset(length=400, seed=0, p_drop_size=0.0, p_drop_background=0.0, p_empty_caption=0.0)
    seen = {"shape": set(), "color": set(), "size": set(), "background": set()}
    for i in range(400):
        item = ds[i]
        assert item["caption"] == f"a {item['size']} {item['color']} {item['shape']} on a {item['background']} background"
        assert item["background"] != item["color"]
        for k in seen:
            seen[k].add(item[k])
    assert seen["shape"] == set(SHAPES) and seen["color"] == set(COLORS) and seen["size"] == set(SIZES)
    spec = ShapeSpec("triangle", "blue", "small", "yellow", 30.0, 30.0, 20.0)
    assert caption_for(spec) == "a small blue triangle on a yellow background"
    assert caption_for(spec, with_size=False, with_background=False) == "a blue triangle"


def test_caption_dropout_rates():
    ds = ShapesDataset(length=2000, seed=1, p_empty_caption=0.1)
    empty = sum(ds[i]["caption"] == "" for i in range(2000)) / 2000
    assert 0.07 < empty < 0.13


def test_render_places_the_shape_and_colors():
    spec = ShapeSpec("square", "red", "large", "white", 32.0, 32.0, 30.0)
    img = render(spec, 64)
    assert tuple(img[32, 32]) == COLORS["red"] and tuple(img[2, 2]) == COLORS["white"]
    assert tuple(img[32, 50]) == COLORS["white"]  # outside the 30 px square centred at 32


def test_bad_parameters_are_clear_errors():
    with pytest.raises(SdgenError, match="p_empty_caption"):
        ShapesDataset(p_empty_caption=1.5)
    with pytest.raises(SdgenError, match="length"):
        ShapesDataset(length="10")
    with pytest.raises(SdgenError, match="batch_size"):
        ShapesDataModule(batch_size=0)
    with pytest.raises(SdgenError, match="unexpected keyword"):
        ShapesDataModule(train={"colour": "red"})


def test_data_module_batches():
    dm = ShapesDataModule(batch_size=4, train={"length": 8, "seed": 0})
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape) == (4, 64, 64, 3) and len(batch["caption"]) == 4


def test_classifier_on_the_data_sets_own_images():
    ds = ShapesDataset(length=600, seed=11)
    color_ok = shape_ok = 0
    for i in range(600):
        item = ds[i]
        found = classify(as_uint8(item))
        color_ok += found.color == item["color"]
        shape_ok += found.shape == item["shape"]
        assert found.background == item["background"]
    assert color_ok == 600 and shape_ok >= 597


def test_classifier_edge_cases():
    blank = np.full((64, 64, 3), 200, dtype=np.uint8)
    assert classify(blank).shape is None and classify(blank).color is None
    assert nearest_color((250, 0, 0)) == "red" and nearest_color((0, 0, 250)) == "blue"
    assert shape_from_features(0.5, 0.25) == "triangle"
    assert shape_from_features(0.785, 0.5) == "circle"
    assert shape_from_features(1.0, 0.5) == "square"
    assert prompt_target("A large Blue circle on a red background") == ("blue", "circle")
    with pytest.raises(ValueError):
        prompt_target("a dog")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    classify(noise)  # any image is classified without error


def test_connected_components_are_4_connected_in_raster_order():
    from ldm.demo.quality import _largest_component, label_components

    mask = np.array([
        [1, 1, 0, 0, 0],
        [0, 1, 0, 1, 1],
        [0, 0, 1, 0, 1],  # (2, 2) touches (1, 1) only diagonally: a component of its own
        [1, 0, 0, 0, 1],
        [1, 1, 0, 1, 1],
    ], dtype=bool)
    labels = label_components(mask)
    assert (labels == 0).sum() == (~mask).sum()
    groups = sorted({int(v) for v in labels[mask]})
    # first pixels in raster order: (0,0) -> 1, (1,3) -> 9, (2,2) -> 13, (3,0) -> 16
    assert groups == [1, 9, 13, 16]
    assert (labels == 9).sum() == 6 and (labels == 13).sum() == 1
    largest = _largest_component(mask)
    assert largest.sum() == 6 and largest[1, 3] and not largest[0, 0]
    tie = np.zeros((3, 5), dtype=bool)
    tie[0, :2] = tie[2, 3:] = True  # two components of 2 pixels: the first in raster order wins
    assert _largest_component(tie).tolist() == (label_components(tie) == 1).tolist()
