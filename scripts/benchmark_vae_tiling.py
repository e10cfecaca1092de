"""Peak host memory and time of decoding one large image with the full-size SD 1.x VAE, tiled and whole.

    python3 scripts/benchmark_vae_tiling.py                  # 2048 x 2048, tiled (--vae-tiling)
    python3 scripts/benchmark_vae_tiling.py --whole          # and the whole decode too (about 10 GB, minutes)

The VAE of configs/stable-diffusion/v1-inference.yaml is built with seeded random weights in a fresh process
per measurement; the process decodes one random latent (1, 4, size/8, size/8) in float32 and reports its peak
resident memory (VmHWM) above the memory it held just before the decode, and the seconds the decode took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
import torch
from ldm.bundled import bundled_path
from ldm.checkpoint import load_config
from ldm.models.vae_tiling import Tiling
from ldm.modules.packed_conv import pack_convolutions
from ldm.util import instantiate_from_config, process_memory as status

size, tiled = int(sys.argv[1]), sys.argv[2] == "tiled"
config = load_config(bundled_path("configs/stable-diffusion/v1-inference.yaml"))
vae = instantiate_from_config(config.model.params.first_stage_config).eval().requires_grad_(False)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in vae.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pack_convolutions(vae)
    vae.tiling = Tiling() if tiled else None
    z = torch.randn(1, 4, size // 8, size // 8, generator=g)
    vae.decode(torch.randn(1, 4, 8, 8, generator=g))  # packs the convolutions
    before = status("VmRSS")
    start = time.perf_counter()
    image = vae.decode(z)
    seconds = time.perf_counter() - start
print(json.dumps({"size": size, "tiled": tiled, "seconds": seconds, "rss_before": before,
                  "peak_rss": status("VmHWM"), "peak_above_before": status("VmHWM") - before,
                  "image_bytes": image.numel() * image.element_size(), "finite": bool(torch.isfinite(image).all())}))
"""


def measure(size: int, tiled: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(size), "tiled" if tiled else "whole"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--whole", action="store_true", help="also decode the whole image (slow, ~10 GB)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [measure(args.size, True)] + ([measure(args.size, False)] if args.whole else [])
    for r in results:
        print(f"{r['size']} px {'tiled' if r['tiled'] else 'whole'}: peak {r['peak_rss'] / 1e9:.2f} GB "
              f"({r['peak_above_before'] / 1e9:.2f} GB above the {r['rss_before'] / 1e9:.2f} GB held before the "
              f"decode), {r['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
