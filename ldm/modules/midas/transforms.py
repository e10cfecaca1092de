"""MiDaS input transform and the depth post-processing of Stable Diffusion 2 depth-to-image.

SAI2 = Stability-AI/stablediffusion cf1d67a. The original prepares the MiDaS input with numpy and OpenCV
(``ldm/data/util.py`` ``AddMiDaS``, ``ldm/modules/midas/api.py`` ``load_midas_transform``,
``ldm/modules/midas/midas/transforms.py``); here the same steps run on torch tensors:

* :func:`midas_input_size`: the ``Resize(384, 384, keep_aspect_ratio=True, ensure_multiple_of=32,
  resize_method="minimal")`` size rule;
* :func:`midas_input`: [-1, 1] image -> [0, 1] -> bicubic resize (:func:`cubic_resize`) -> (x - 0.5) / 0.5;
* :func:`depth_conditioning`: depth -> latent size -> per-sample min-max to [-1, 1] (the UNet's 5th channel);
* :func:`depth_preview`: depth -> uint8 0..255 picture as the gradio script shows it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.errors import SdgenError

#: MiDaS DPT input size and side multiple (SAI2 api.py ``load_midas_transform``: net_w = net_h = 384,
#: ``ensure_multiple_of=32``)
NET_SIZE = 384
NET_MULTIPLE = 32
#: the denominator offset of the model's own ``get_input`` (SAI2 ``ldm/models/diffusion/ddpm.py`` l.1714-1723);
#: the depth2img scripts use none (gradio ``depth2img.py`` l.89-91)
GET_INPUT_EPS = 0.001
#: the cubic kernel parameter of OpenCV's INTER_CUBIC (imgproc ``interpolateCubic``) and of torch's bicubic
CUBIC_A = -0.75


def _round_half_even(x: float) -> int:
    """numpy's ``np.round`` on a float64 (round half to even), which Python's ``round`` also does."""
    return int(round(x))


def midas_input_size(h: int, w: int, target: int = NET_SIZE, multiple: int = NET_MULTIPLE) -> tuple[int, int]:
    """The MiDaS network size (h', w') in pixels for an image of h x w pixels.

    SAI2 ``midas/transforms.py`` ``Resize.get_size`` with ``keep_aspect_ratio=True, resize_method="minimal"``:
    of the two scale factors target/h and target/w the one closer to 1 is used for both sides (the height's on a
    tie), and each scaled side is rounded to the nearest multiple of ``multiple`` (half to even, no minimum or
    maximum), all in float64. E.g. 512x768 -> 384x576, 24x40 -> 224x384, 300x1000 -> 384x1280.

    Raises:
        SdgenError: if a side is not positive, or rounds to 0 (an image too elongated; the original fails there).
    """
    if h <= 0 or w <= 0:
        raise SdgenError(f"image size must be positive, got {h}x{w}")
    scale_h, scale_w = target / h, target / w
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w  # fit width
    else:
        scale_w = scale_h  # fit height
    # constrain_to_multiple_of: np.round(x / m) * m
    new_h = _round_half_even(scale_h * h / multiple) * multiple
    new_w = _round_half_even(scale_w * w / multiple) * multiple
    if new_h <= 0 or new_w <= 0:
        raise SdgenError(f"a {h}x{w} image is too elongated for the depth model: it would be resized to "
                         f"{new_h}x{new_w}; crop it closer to a {target}-pixel aspect")
    return new_h, new_w


def _cubic_taps(n_in: int, n_out: int, a: float = CUBIC_A) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (n_out, 4) int64 and weights (n_out, 4) float64 of a 1-D bicubic resize n_in -> n_out.

    Half-pixel centres: output pixel o samples source position (o + 0.5) * n_in / n_out - 0.5; the four taps are
    the pixels floor(pos) - 1 .. floor(pos) + 2, clamped to the image (edge replication); the weights are Keys'
    cubic kernel with parameter ``a`` at the tap distances. All in float64.
    """
    pos = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    base = torch.floor(pos)
    offsets = torch.arange(-1, 3, dtype=torch.float64)
    dist = (pos - base)[:, None] - offsets  # distance from each tap, in [-2, 2]
    x = dist.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    weights = torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    index = (base[:, None] + offsets).to(torch.int64).clamp_(0, n_in - 1)
    return index, weights


def cubic_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """OpenCV's ``cv2.resize(..., interpolation=INTER_CUBIC)`` of a float image batch, without OpenCV.

    Args:
        x: (B, C, H, W) float.
        size: (h, w) output size in pixels.
    Returns:
        (B, C, h, w) float32. The filter is OpenCV's: Keys' cubic with a = -0.75, half-pixel centres, edge
        replication at the border, and no antialiasing when shrinking. It is computed separably in float64 and
        rounded once, so it is the same on every CPU and within float32 rounding of the exact filter.

    Why not ``F.interpolate(mode="bicubic", align_corners=False)``: it is the same filter but places its taps in
    float32, which is off by up to 5e-5 on [0, 1] data at 512 -> 384 pixels, while OpenCV's float32 resize (the
    x86 opencv-python 5.1 wheel, with IPP) is within 2.4e-7 of the exact filter (measured).
    """
    h, w = (int(s) for s in size)
    y = x.to(torch.float64)
    index, weights = _cubic_taps(y.shape[-2], h)
    y = sum(weights[:, k, None] * y[..., index[:, k], :] for k in range(4))
    index, weights = _cubic_taps(y.shape[-1], w)
    y = sum(weights[:, k] * y[..., index[:, k]] for k in range(4))
    return y.to(torch.float32)


def midas_input(image: torch.Tensor) -> torch.Tensor:
    """The normalised MiDaS input of an image batch (SAI2 ``AddMiDaS`` + ``load_midas_transform("dpt_hybrid")``).

    Args:
        image: (B, 3, H, W) in [-1, 1], as sdgen holds init images (float; computed in float32).
    Returns:
        (B, 3, h', w') float32 with (h', w') = :func:`midas_input_size` (H, W): ``(x + 1) * 0.5`` back to [0, 1],
        :func:`cubic_resize` (the original's cv2 INTER_CUBIC), then ``(x - 0.5) / 0.5`` (``NormalizeImage``, mean
        and std 0.5). Values may leave [-1, 1] slightly where the cubic filter overshoots.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise SdgenError(f"the MiDaS transform expects a (B, 3, H, W) image batch, got shape {tuple(image.shape)}")
    size = midas_input_size(int(image.shape[2]), int(image.shape[3]))
    x = (image.to(torch.float32) + 1.0) * 0.5  # AddMiDaS.pt2np
    if tuple(x.shape[2:]) != size:  # cv2.resize copies an image that already has the size
        x = cubic_resize(x, size)
    return (x - 0.5) / 0.5


def _per_sample_range(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample min and max of (B, C, H, W), shape (B, 1, 1, 1) each (torch.amin / amax over dims 1-3)."""
    return torch.amin(depth, dim=[1, 2, 3], keepdim=True), torch.amax(depth, dim=[1, 2, 3], keepdim=True)


def _check_depth(depth: torch.Tensor, what: str) -> None:
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise SdgenError(f"{what} expects a (B, 1, H, W) depth batch, got shape {tuple(depth.shape)}")


def depth_conditioning(depth: torch.Tensor, latent_hw: Sequence[int], eps: float = 0.0) -> torch.Tensor:
    """The depth channel of the depth-to-image UNet input.

    Args:
        depth: (B, 1, H', W') MiDaS output (:class:`ldm.modules.midas.api.MiDaSInference`), >= 0.
        latent_hw: (h, w) latent size (image size / 8).
        eps: added to the denominator: 0 as the depth2img scripts (gradio ``depth2img.py`` l.75-92), or
            ``GET_INPUT_EPS`` (0.001) as the model's ``get_input`` (ddpm.py l.1714-1723).
    Returns:
        (B, 1, h, w) in [-1, 1] per sample: bicubic resize (align_corners False), then
        ``2 * (d - min) / (max - min + eps) - 1``. Where a sample's resized depth is constant and ``eps`` is 0
        (the original divides 0 by 0) the result is -1 everywhere, the limit of the ``eps > 0`` formula.
    """
    _check_depth(depth, "depth_conditioning")
    cc = F.interpolate(depth, size=tuple(int(s) for s in latent_hw), mode="bicubic", align_corners=False)
    d_min, d_max = _per_sample_range(cc)
    denom = d_max - d_min + eps
    out = 2.0 * (cc - d_min) / denom - 1.0
    return torch.where(denom == 0, torch.full_like(out, -1.0), out)


def depth_preview(depth: torch.Tensor) -> torch.Tensor:
    """A depth picture to save next to the results (gradio ``depth2img.py`` l.78-82, per sample).

    Args:
        depth: (B, 1, H', W') MiDaS output.
    Returns:
        (B, H', W') uint8: ``(d - min) / (max - min) * 255`` truncated toward zero (numpy ``astype(uint8)``), per
        sample; near = bright. A constant map gives 0 (the original divides 0 by 0).
    """
    _check_depth(depth, "depth_preview")
    d = depth.detach().to(torch.float32)
    d_min, d_max = _per_sample_range(d)
    span = d_max - d_min
    shown = (d - d_min) / torch.where(span == 0, torch.ones_like(span), span) * 255.0
    return shown[:, 0].clamp(0.0, 255.0).to(torch.uint8)
