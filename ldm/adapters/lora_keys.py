"""Where the layers a LoRA file names live in an sdgen model (original checkpoint names).

LoRA files name their layers in one of these ways (kohya sd-scripts' README and networks/lora.py naming, the
diffusers and peft documentation):

* kohya / AUTOMATIC1111: ``lora_unet_<path>``, ``lora_te_<path>`` (SD 1.x / 2.x), ``lora_te1_`` / ``lora_te2_``
  (SDXL), the module path with ``.`` written ``_``. The UNet path is the diffusers one for SD 1.x / 2.x
  (``down_blocks_0_attentions_0_...``) and the original (``input_blocks_4_1_...``) for SDXL; both are accepted
  for every family. Text encoder paths are transformers' CLIP names (``text_model_encoder_layers_0_self_attn_
  q_proj``), also for the OpenCLIP encoders of SD 2.x and SDXL.
* diffusers / peft: ``unet.<diffusers path>``, ``text_encoder.<path>``, ``text_encoder_2.<path>`` with dots.

:func:`lora_targets` lists, for every weight a LoRA may change, each name a file may use for it. OpenCLIP fuses
q, k and v into one ``in_proj_weight``: a LoRA of ``q_proj`` changes the first third of its rows (k the second, v
the last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from torch import nn

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


@dataclass(frozen=True)
class Target:
    """A weight a LoRA changes: its state_dict key, the rows it owns (a third of a fused in_proj) or None for all,
    and the encoder family for messages ("unet", "te", "te1", "te2")."""

    key: str
    rows: Optional[tuple[int, int]] = None
    part: str = "unet"


def _unet_blocks(unet: nn.Module) -> dict[str, str]:
    """Original -> diffusers name of each UNet sub-block (``input_blocks.4.1`` -> ``down_blocks.1.attentions.0``)."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    names: dict[str, str] = {}
    level, resnet = 0, 0
    for n, block in enumerate(unet.input_blocks):
        if n == 0:
            continue
        first = block[0]
        if isinstance(first, Downsample) or (isinstance(first, ResBlock) and getattr(first, "down", False)):
            names[f"input_blocks.{n}.0"] = f"down_blocks.{level}.downsamplers.0"
            level, resnet = level + 1, 0
            continue
        names[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{resnet}"
        if len(block) > 1:
            names[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{resnet}"
        resnet += 1
    names.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                  "middle_block.2": "mid_block.resnets.1"})
    per_level = [r + 1 for r in reversed(list(unet.num_res_blocks))]
    n = 0
    for up, count in enumerate(per_level):
        for i in range(count):
            block = unet.output_blocks[n]
            names[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{i}"
            for j, layer in enumerate(list(block)[1:], start=1):
                if isinstance(layer, Upsample) or (isinstance(layer, ResBlock) and getattr(layer, "up", False)):
                    names[f"output_blocks.{n}.{j}"] = f"up_blocks.{up}.upsamplers.0"
                else:
                    names[f"output_blocks.{n}.{j}"] = f"up_blocks.{up}.attentions.{i}"
            n += 1
    return names


def diffusers_unet_name(path: str, blocks: dict[str, str]) -> Optional[str]:
    """The diffusers name of an original UNet module path (None when diffusers has no such module)."""
    for original, renamed in _TOP.items():
        if path == original or path.startswith(original + "."):
            return renamed + path[len(original):]
    parts = path.split(".")
    size = 2 if parts[0] == "middle_block" else 3  # middle_block.N, input_blocks.N.M, output_blocks.N.M
    if len(parts) < size:
        return None
    block, rest = ".".join(parts[:size]), ".".join(parts[size:])
    if block not in blocks:
        return None
    renamed = blocks[block]
    if ".resnets." in renamed:
        for original, inner in _RESNET.items():
            if rest == original or rest.startswith(original + "."):
                rest = inner + rest[len(original):]
                break
    elif renamed.endswith("downsamplers.0") and rest.startswith("op"):
        rest = "conv" + rest[2:]
    return f"{renamed}.{rest}" if rest else renamed


_OPENCLIP_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _text_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state_dict prefix, encoder) of the model's text encoders, in conditioning order."""
    if hasattr(model, "conditioner"):
        return [(f"conditioner.embedders.{i}.", e) for i, e in enumerate(model.conditioner.embedders)
                if hasattr(e, "encode_ids")]
    encoder = getattr(model, "cond_stage_model", None)
    return [("cond_stage_model.", encoder)] if hasattr(encoder, "encode_ids") else []


def _layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield name, child


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of ``model`` (module docstring) -> the weight it changes."""
    out: dict[str, Target] = {}
    unet = model.model.diffusion_model
    blocks = _unet_blocks(unet)
    for path, _layer in _layers(unet):
        target = Target(f"model.diffusion_model.{path}.weight")
        out["lora_unet_" + path.replace(".", "_")] = target
        renamed = diffusers_unet_name(path, blocks)
        if renamed is not None:
            out["lora_unet_" + renamed.replace(".", "_")] = target
            out["unet." + renamed] = target
    encoders = _text_encoders(model)
    kohya = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    peft = ["text_encoder"] if len(encoders) == 1 else ["text_encoder", "text_encoder_2"]
    for (prefix, encoder), k_name, p_name in zip(encoders, kohya, peft):
        part = k_name.replace("lora_", "")
        if hasattr(encoder, "transformer"):  # transformers CLIPTextModel: its own names
            for path, _layer in _layers(encoder.transformer):
                target = Target(f"{prefix}transformer.{path}.weight", part=part)
                out[f"{k_name}_" + path.replace(".", "_")] = target
                out[f"{p_name}.{path}"] = target
            continue
        for i, block in enumerate(encoder.model.transformer.resblocks):
            base = f"{prefix}model.transformer.resblocks.{i}."
            hf = f"text_model.encoder.layers.{i}."
            width = block.attn.in_proj_weight.shape[1]
            names = {f"self_attn.{p}_proj": Target(f"{base}attn.in_proj_weight", (k * width, (k + 1) * width), part)
                     for k, p in enumerate("qkv")}
            names.update({hf_name: Target(f"{base}{oc}.weight", part=part) for oc, hf_name in _OPENCLIP_TO_HF.items()})
            for name, target in names.items():
                out[f"{k_name}_" + (hf + name).replace(".", "_")] = target
                out[f"{p_name}.{hf}{name}"] = target
    return out
