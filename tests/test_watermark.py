"""The invisible watermark: embed the originals' messages and read them back."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ldm.errors import SdgenError
from ldm.safety import watermark as wm
from ldm.safety.watermark import (
    SD1_MESSAGE,
    SD2_MESSAGE,
    SDXL_BITS,
    apply_watermark,
    message_for_family,
    read_watermark,
)

pytest.importorskip("imwatermark")

REPO = Path(__file__).resolve().parent.parent


def natural_image(width: int = 320, height: int = 288) -> Image.Image:
    """Flat-shaded shapes, lightly blurred: a cartoon-like picture.

    The library's dwtDct marks the largest non-DC coefficient of each 4x4 block of the wavelet
    approximation; on long smooth gradients that position moves after uint8 rounding and bits get lost,
    as on noise. Flat regions with edges decode reliably (and the same fixed image always decodes alike).
    """
    img = Image.new("RGB", (width, height), (90, 120, 150))
    draw = ImageDraw.Draw(img)
    w, h = width, height
    draw.ellipse((w * 0.1, h * 0.15, w * 0.5, h * 0.6), fill=(200, 150, 80))
    draw.rectangle((w * 0.55, h * 0.4, w * 0.9, h * 0.85), fill=(60, 140, 90))
    draw.polygon([(w * 0.2, h * 0.9), (w * 0.45, h * 0.65), (w * 0.6, h * 0.95)], fill=(170, 60, 70))
    return img.filter(ImageFilter.GaussianBlur(2))


def test_sdxl_bits_are_the_sgm_message() -> None:
    assert len(SDXL_BITS) == 48
    assert "".join(map(str, SDXL_BITS)) == "101100111110110010010000011110111011000110011110"
    assert message_for_family("sd1") == b"StableDiffusionV1" and message_for_family("SD2") == b"SDV2"
    assert message_for_family("sdxl") == SDXL_BITS
    with pytest.raises(SdgenError, match="known: sd1"):
        message_for_family("dalle")


@pytest.mark.parametrize("message", [SD1_MESSAGE, SD2_MESSAGE, SDXL_BITS], ids=["sd1", "sd2", "sdxl"])
def test_roundtrip(message) -> None:
    img = natural_image()
    marked = apply_watermark(img, message)
    assert marked.size == img.size and marked.mode == "RGB"
    diff = np.abs(np.asarray(marked, dtype=np.int16) - np.asarray(img, dtype=np.int16))
    assert diff.max() > 0 and diff.mean() < 3.0  # changed, but invisibly
    expected = list(message) if not isinstance(message, bytes) else message
    assert read_watermark(marked, message) == expected
    assert read_watermark(img, message) != expected
    # the same mark on an (H, W, 3) uint8 array, as the output writer holds images
    marked_array = apply_watermark(np.asarray(img), message)
    assert isinstance(marked_array, np.ndarray) and np.array_equal(marked_array, np.asarray(marked))


def test_survives_png_roundtrip(tmp_path) -> None:
    path = tmp_path / "marked.png"
    apply_watermark(natural_image(512, 512), SD1_MESSAGE).save(path)
    assert read_watermark(Image.open(path), 136) == SD1_MESSAGE


def test_small_image_left_unchanged(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wm, "_warned", set())
    img = natural_image(128, 128)
    with caplog.at_level(logging.WARNING, logger="ldm.safety.watermark"):
        assert apply_watermark(img) is img
        assert apply_watermark(img) is img
    assert caplog.text.count("not watermarked") == 1


def test_missing_library_leaves_image(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wm, "_warned", set())
    monkeypatch.setitem(sys.modules, "imwatermark", None)
    assert not wm.watermark_available()
    img = natural_image()
    with caplog.at_level(logging.WARNING, logger="ldm.safety.watermark"):
        assert apply_watermark(img) is img
    assert "not installed" in caplog.text
    with pytest.raises(SdgenError, match="invisible-watermark"):
        read_watermark(img)


def test_output_safety_marks_with_the_family_message() -> None:
    """What every command applies to a saved image: the original scripts' message of the model family."""
    from ldm.checkpoint import load_config
    from ldm.safety.postprocess import OutputSafety

    sd2 = load_config(REPO / "configs/stable-diffusion/v2-inference-v.yaml")
    safety = OutputSafety.resolve(None, model_config=sd2)
    assert safety.checker is None and safety.manifest() == {"checker": None, "watermark": "SDV2"}
    assert safety.png_settings(None) == {"Safety checker": "none"}
    pixels = np.asarray(natural_image())
    assert read_watermark(Image.fromarray(safety.mark(pixels)), SD2_MESSAGE) == SD2_MESSAGE
    off = OutputSafety.resolve(None, watermark=False, model_config=sd2)
    assert off.mark(pixels) is pixels and off.manifest()["watermark"] is None
    sdxl = load_config(REPO / "configs/sdxl/sd_xl_base.yaml")
    assert OutputSafety.resolve(None, model_config=sdxl).manifest()["watermark"] == "".join(map(str, SDXL_BITS))
