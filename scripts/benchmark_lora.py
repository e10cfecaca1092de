"""Time a stack of LoRA files on the full-size SD 1.x model (random weights, no download).

Builds the released SD 1.x architecture (configs/stable-diffusion/v1-inference.yaml) with random float32 weights,
writes N kohya-layout LoRA files of rank R covering every attention and feed-forward projection of the UNet and
the text encoder (as sd-scripts' default LoRA does), then times what a run does with them:

* plan: build the model on the meta device and check every file's keys and shapes against it;
* merge: read the files and merge dW = weight * (alpha / rank) * up @ down into the weights.

    python scripts/benchmark_lora.py --loras 4 --rank 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.adapters.lora import match_lora, merge_lora, read_lora
from ldm.adapters.lora_keys import lora_targets
from ldm.bundled import bundled_path
from ldm.checkpoint import build_model_on_meta, load_config

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2",
               "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_loras(model: torch.nn.Module, count: int, rank: int, folder: Path) -> list[Path]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    targets = {n: t for n, t in lora_targets(model).items()
               if n.startswith(("lora_unet_down", "lora_unet_mid", "lora_unet_up", "lora_te_")) and n.endswith(PROJECTIONS)}
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, target in targets.items():
            out, *rest = shapes[target.key]
            tensors[f"{name}.lora_down.weight"] = (torch.randn((rank, *rest), generator=g) * 0.01).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn((out, rank, *([1, 1] if rest[1:] else [])),
                                                             generator=g) * 0.01).half()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
        path = folder / f"lora{i}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    config = load_config(bundled_path("configs/stable-diffusion/v1-inference.yaml"))
    meta = build_model_on_meta(config)
    model = meta.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_loras(meta, args.loras, args.rank, Path(tmp))
        size = sum(p.stat().st_size for p in paths) / 2**20
        start = time.perf_counter()
        check = build_model_on_meta(config)
        targets = lora_targets(check)
        shapes = {k: tuple(v.shape) for k, v in check.state_dict().items()}
        matched = [match_lora(p, *read_lora(p), targets, shapes) for p in paths]
        planned = time.perf_counter() - start
        start = time.perf_counter()
        for p in paths:
            merge_lora(model, match_lora(p, *read_lora(p), targets, shapes), 0.7)
        merged = time.perf_counter() - start
    layers = sum(len(m) for m in matched)
    print(f"{args.loras} LoRA files of rank {args.rank} ({size:.0f} MiB, {layers} layers) on the SD 1.x model "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {torch.get_num_threads()} threads): "
          f"plan check {planned:.2f} s, read + merge {merged:.2f} s")


if __name__ == "__main__":
    main()
