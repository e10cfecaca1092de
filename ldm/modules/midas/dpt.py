"""MiDaS v3 DPT-Hybrid: a ResNet-50 + ViT-B/16 backbone (timm) with the DPT reassemble and fusion decoder.

The network that Stable Diffusion 2 depth-to-image runs on its init image (SAI2 = Stability-AI/stablediffusion
cf1d67a, ``ldm/modules/midas/midas/{dpt_depth,vit,blocks}.py``). The module tree reproduces the original's
parameter names exactly (368 parameters, no buffers), so the ``depth_model.model.*`` entries of
``512-depth-ema.ckpt`` load without renaming:

* ``pretrained.model``: timm's ``vit_base_r50_s16_384`` (formerly ``vit_base_resnet50_384``), 308 parameters;
* ``pretrained.act_postprocess3`` / ``4``: reassembly of ViT blocks 8 and 11 (readout projection, 1x1 conv,
  and a stride-2 3x3 conv for the last one);
* ``scratch.layer{1..4}_rn``: 3x3 convs to 256 channels; ``scratch.refinenet{1..4}``: fusion blocks;
  ``scratch.output_conv``: the depth head.

Nothing is loaded or downloaded here: timm builds the backbone with ``pretrained=False`` and the weights come
from the checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import SdgenError

#: timm's name of the DPT-Hybrid backbone (SAI2 vit.py ``_make_pretrained_vitb_rn50_384`` asks for the older alias
#: ``vit_base_resnet50_384``; timm >= 0.9 maps that alias to this model, same parameters)
TIMM_BACKBONE = "vit_base_r50_s16_384"
#: ViT width, patch size of the token grid (pixels per token side), and the DPT feature widths per level
#: (SAI2 vit.py ``_make_vit_b_rn50_backbone``: features [256, 512, 768, 768]; dpt_depth.py ``DPT``: features 256)
VIT_WIDTH = 768
PATCH = 16
LEVEL_WIDTHS = (256, 512, 768, 768)
FEATURES = 256
#: ViT blocks whose outputs become the 3rd and 4th reassembled maps (SAI2 dpt_depth.py ``DPT``: hooks
#: [0, 1, 8, 11] for "vitb_rn50_384"; for the hybrid the first two hooks are the ResNet stages 0 and 1)
VIT_HOOKS = (8, 11)


def _timm_backbone() -> nn.Module:
    """timm's hybrid ViT with random init (no file, no download), on the current default device."""
    try:
        import timm
    except ImportError as exc:  # a declared dependency; this only explains a broken install
        raise SdgenError("the MiDaS depth model needs timm: pip install 'timm>=0.9'") from exc
    # timm runs the ResNet once on a zero image while building, to learn its output grid. Under a meta build that
    # only moves parameters to meta (ldm.checkpoint), that image must be on meta as well: build where parameters
    # land. 1000 classes: the classifier head is unused, but its weights are in the released file.
    with torch.device(_parameter_device()):
        return timm.create_model(TIMM_BACKBONE, pretrained=False, num_classes=1000)


def _parameter_device() -> torch.device:
    """The device a newly registered parameter ends up on in the current context (meta during a meta build)."""
    probe = nn.Module()
    probe.register_parameter("p", nn.Parameter(torch.empty(0)))
    return probe.p.device


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, start_index: int = 1) -> torch.Tensor:
    """The 384x384 position embedding resized to a ``grid_h`` x ``grid_w`` token grid.

    Args:
        pos_embed: (1, start_index + G*G, C), the class-token entry first, then a square G x G grid.
    Returns:
        (1, start_index + grid_h*grid_w, C): the token entries unchanged, the grid resized bilinearly with
        ``align_corners=False`` (SAI2 vit.py ``_resize_pos_embed``).
    """
    tok, grid = pos_embed[:, :start_index], pos_embed[0, start_index:]
    side = int(round(grid.shape[0] ** 0.5))
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([tok, grid], dim=1)


class ProjectReadout(nn.Module):
    """The "project" readout: each patch token concatenated with the class token, then Linear(2C -> C) + GELU.

    (B, 1 + N, C) -> (B, N, C). SAI2 vit.py ``ProjectReadout`` (the order is [token, class token]).
    """

    def __init__(self, width: int = VIT_WIDTH, start_index: int = 1) -> None:
        super().__init__()
        self.start_index = start_index
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x[:, self.start_index:]
        readout = x[:, :1].expand_as(tokens)
        return self.project(torch.cat((tokens, readout), -1))


class _Placeholder(nn.Identity):
    """Keeps the original's Sequential positions: there positions 1 and 2 transpose and unflatten the tokens
    to a fixed 24x24 grid, but the original's forward skips them and unflattens to the input's grid instead
    (SAI2 vit.py ``forward_vit``); :meth:`HybridViTBackbone.forward` does that, so these do nothing."""


def _reassemble(width_out: int, downsample: bool) -> nn.Sequential:
    """[readout, (transpose), (unflatten), 1x1 conv to ``width_out``, optional 3x3 stride-2 conv] as in SAI2 vit.py
    ``_make_vit_b_rn50_backbone`` (``act_postprocess3`` / ``act_postprocess4``)."""
    layers: list[nn.Module] = [ProjectReadout(VIT_WIDTH), _Placeholder(), _Placeholder(),
                               nn.Conv2d(VIT_WIDTH, width_out, kernel_size=1, stride=1, padding=0)]
    if downsample:
        layers.append(nn.Conv2d(width_out, width_out, kernel_size=3, stride=2, padding=1))
    return nn.Sequential(*layers)


class HybridViTBackbone(nn.Module):
    """The DPT encoder (``pretrained`` in the original): four feature maps from an image.

    For an input (B, 3, H, W) with H, W multiples of 32 the maps are (SAI2 vit.py ``forward_vit``):
    ResNet stage 0 (B, 256, H/4, W/4), ResNet stage 1 (B, 512, H/8, W/8), ViT block 8 reassembled
    (B, 768, H/16, W/16) and ViT block 11 reassembled (B, 768, H/32, W/32).
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = _timm_backbone()
        # act_postprocess1 / 2 of the original are parameter-free identities for the hybrid (the ResNet maps are
        # used as they are), so they are not modules here; they contribute no state_dict keys.
        self.act_postprocess3 = _reassemble(LEVEL_WIDTHS[2], downsample=False)
        self.act_postprocess4 = _reassemble(LEVEL_WIDTHS[3], downsample=True)

    def _tokens_to_map(self, post: nn.Sequential, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, 1 + N, C) block output -> reassembled map (B, C', grid_h or /2, grid_w or /2)."""
        x = post[0](x).transpose(1, 2)
        x = x.unflatten(2, (grid_h, grid_w))
        return post[3:](x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised image -> the four maps listed in the class docstring."""
        vit = self.model
        grid_h, grid_w = x.shape[2] // PATCH, x.shape[3] // PATCH
        # SAI2 vit.py forward_flex: position embedding resized to the token grid
        pos_embed = resize_pos_embed(vit.pos_embed, grid_h, grid_w)
        cnn = vit.patch_embed.backbone
        # ResNetV2 forward split at the stages the original hooks (stages[0], stages[1]); its final norm is
        # an identity for this non-pre-activation ResNet, its head an identity (num_classes 0, no pooling)
        h = cnn.stem(x)
        layer_1 = cnn.stages[0](h)
        layer_2 = cnn.stages[1](layer_1)
        h = cnn.norm(cnn.stages[2](layer_2))
        tokens = vit.patch_embed.proj(h).flatten(2).transpose(1, 2)
        tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1) + pos_embed
        hooked: dict[int, torch.Tensor] = {}
        for i, block in enumerate(vit.blocks[: max(VIT_HOOKS) + 1]):
            tokens = block(tokens)
            if i in VIT_HOOKS:
                hooked[i] = tokens
        # the ViT's final norm (forward_flex's return value) is not used by the DPT, so it is not run
        layer_3 = self._tokens_to_map(self.act_postprocess3, hooked[VIT_HOOKS[0]], grid_h, grid_w)
        layer_4 = self._tokens_to_map(self.act_postprocess4, hooked[VIT_HOOKS[1]], grid_h, grid_w)
        return layer_1, layer_2, layer_3, layer_4


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias, no norm (SAI2 blocks.py ``ResidualConvUnit_custom``
    with ``bn=False`` and a non-inplace ReLU, dpt_depth.py ``_make_fusion_block``). Shape (B, C, H, W) kept."""

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        return out + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion (SAI2 blocks.py ``FeatureFusionBlock_custom``, expand False, align_corners True).

    ``forward(path)`` or ``forward(path, skip)``: path (+ resConfUnit1(skip)), then resConfUnit2, a 2x bilinear
    upsample with ``align_corners=True``, and a 1x1 conv. (B, C, H, W) -> (B, C, 2H, 2W).
    ``refinenet4`` is called without a skip, so its ``resConfUnit1`` is never used (its weights still exist).
    """

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, stride=1, padding=0, bias=True)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        out = self.resConfUnit2(path)
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class Interpolate(nn.Module):
    """Parameter-free resize by ``scale_factor`` inside the head (SAI2 blocks.py ``Interpolate``)."""

    def __init__(self, scale_factor: float, mode: str, align_corners: bool) -> None:
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


def depth_head(features: int = FEATURES) -> nn.Sequential:
    """(B, 256, H/2, W/2) -> (B, 1, H, W) >= 0: conv3x3 -> 2x bilinear (align_corners True) -> conv3x3 -> ReLU ->
    conv1x1 -> ReLU (``non_negative=True``) -> identity (SAI2 dpt_depth.py ``DPTDepthModel.__init__``; the
    positions 0, 2, 4 carry the ``output_conv.{0,2,4}`` weights)."""
    return nn.Sequential(
        nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1),
        Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(features // 2, 32, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, kernel_size=1, stride=1, padding=0),
        nn.ReLU(),
        nn.Identity(),
    )


class DPTDepthModel(nn.Module):
    """MiDaS DPT-Hybrid (SAI2 dpt_depth.py ``DPT`` + ``DPTDepthModel``, backbone "vitb_rn50_384", readout
    "project", features 256, no batch norm, ``non_negative=True``). Built with random init; load weights into it.

    ``forward`` maps a normalised image (B, 3, H, W), H and W multiples of 32, to relative inverse depth
    (B, H, W) >= 0 (larger = nearer).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = HybridViTBackbone()
        self.scratch = nn.Module()
        # SAI2 blocks.py _make_scratch: 3x3 convs without bias to FEATURES channels (groups 1, expand False)
        for i, width in enumerate(LEVEL_WIDTHS, start=1):
            self.scratch.add_module(f"layer{i}_rn", nn.Conv2d(width, FEATURES, kernel_size=3, stride=1,
                                                              padding=1, bias=False))
        for i in range(1, 5):
            self.scratch.add_module(f"refinenet{i}", FeatureFusionBlock(FEATURES))
        self.scratch.output_conv = depth_head(FEATURES)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four reassembled encoder maps (see :class:`HybridViTBackbone`)."""
        return self.pretrained(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H, W) >= 0 (SAI2 dpt_depth.py ``DPT.forward``, then ``squeeze(dim=1)``)."""
        s = self.scratch
        layer_1, layer_2, layer_3, layer_4 = self.forward_features(x)
        path_4 = s.refinenet4(s.layer4_rn(layer_4))
        path_3 = s.refinenet3(path_4, s.layer3_rn(layer_3))
        path_2 = s.refinenet2(path_3, s.layer2_rn(layer_2))
        path_1 = s.refinenet1(path_2, s.layer1_rn(layer_1))
        return s.output_conv(path_1).squeeze(dim=1)
