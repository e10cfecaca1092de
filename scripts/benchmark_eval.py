"""Throughput of the evaluation networks on this machine (random weights of the real sizes, no download).

* Q16: CLIP ViT-L/14's image tower (transformers, 224 px) with the preprocessing of ``sdgen eval i2p``;
* NudeNet stand-in: torchvision's RetinaNet ResNet-50 FPN at 800 x 800 (NudeNet v2's detector is a keras-retinanet
  ResNet-50 at the same input size; the authors' ONNX file itself is not at hand);
* FID / KID: torch-fidelity's Inception v3 size (torchvision's inception_v3 at 299 px, pool features).

    python scripts/benchmark_eval.py --images 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rate(fn, images: int, repeats: int = 2) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return images / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from torchvision.models import inception_v3
    from torchvision.models.detection import retinanet_resnet50_fpn
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ldm.eval.q16 import clip_preprocess

    n = args.images
    pixels = torch.randint(0, 256, (n, 3, 512, 512), dtype=torch.uint8)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                          num_hidden_layers=24, num_attention_heads=16,
                                                          patch_size=14, projection_dim=768)).eval()
    detector = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=800, max_size=1333).eval()
    inception = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    inception.fc = torch.nn.Identity()
    with torch.no_grad():
        results = {
            "threads": torch.get_num_threads(),
            "q16_clip_vit_l14_images_per_s": rate(lambda: clip(pixel_values=clip_preprocess(pixels)), n),
            "retinanet_800px_images_per_s": rate(lambda: [detector([p.float() / 255]) for p in pixels[:4]], 4, 1),
            "inception_299px_images_per_s": rate(
                lambda: inception(torch.nn.functional.interpolate(pixels.float() / 255, size=(299, 299))), n),
        }
    results = {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
