"""Peak memory and time of the full-size x4 upscaler's UNet step and VAE decode, whole and tiled (``--tile``).

    python3 scripts/benchmark_upscale.py                                   # the cases measured for the README
    python3 scripts/benchmark_upscale.py --cases unet:256:whole vae:256:tiled --json out.json

The UNet and the VAE of configs/stable-diffusion/x4-upscaling.yaml are built with torch's default initialisation
(random weights: only the shapes matter for time and memory), float32 on the CPU with packed convolutions as an
``sdgen upscale`` run has them. Each case runs in a fresh process: after a small warm-up call (which packs the
convolutions) the process's peak-resident counter is reset (Linux ``/proc/self/clear_refs``), then it runs

* ``unet:SIZE:whole``: one UNet step on the CFG batch of 2 at a SIZE x SIZE low-res input (latent = low-res
  size, 7 input channels, a 77-token text context, the noise level as class label);
* ``unet:SIZE:tiled``: the same step through :class:`ldm.sampling.tiled.TiledDenoiser` (128-pixel tiles);
* ``vae:SIZE:whole`` / ``vae:SIZE:tiled``: the decode of one (1, 4, SIZE, SIZE) latent to a 4 SIZE image, whole or
  in 64-latent-pixel tiles (:mod:`ldm.models.vae_tiling`, as ``--tile`` enables it),

and reports the seconds and the peak resident memory above what the process held before the call. The table then
covers low-res inputs of 128, 256 and 512 px (512, 1024, 2048 px out) and the measured sizes: cases not measured are extrapolated from the
measured ones (whole: time and memory linear in pixels, fitted through the two largest measured sizes; tiled:
the number of tiles times the measured time of one tile, the memory of one tile plus the output) and marked so.
The CPU is named from ``lscpu``. The measured per-pixel slopes set ``UPSCALE_UNET_BYTES`` and
``UPSCALE_DECODER_BYTES`` in ldm/generation/inputs.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9
SIZES = (128, 256, 512)
DEFAULT_CASES = ("unet:32:whole", "unet:64:whole", "vae:32:whole", "vae:64:whole", "vae:96:tiled")

_CHILD = r"""
import json, sys, time
import torch
from ldm.bundled import bundled_path
from ldm.checkpoint import load_config
from ldm.modules.packed_conv import pack_convolutions
from ldm.util import instantiate_from_config, process_memory as status

part, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = load_config(bundled_path("configs/stable-diffusion/x4-upscaling.yaml")).model.params
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    if part == "unet":
        from ldm.sampling.tiled import TiledDenoiser

        unet = instantiate_from_config(config.unet_config).eval().requires_grad_(False)
        pack_convolutions(unet)

        def denoiser(x, sigma, cond):
            return unet(torch.cat([x, cond["concat"]], dim=1), sigma, context=cond["crossattn"], y=cond["vector"])

        def inputs(n):
            return (torch.randn(2, 4, n, n, generator=g), torch.full((2,), 500.0),
                    {"concat": torch.randn(2, 3, n, n, generator=g), "crossattn": torch.randn(2, 77, 1024, generator=g),
                     "vector": torch.full((2,), 20, dtype=torch.long)})

        run = TiledDenoiser(denoiser) if mode == "tiled" else denoiser
        denoiser(*inputs(16))  # packs the convolutions
        x, sigma, cond = inputs(size)
        call = lambda: run(x, sigma, cond)
    else:
        from ldm.models.vae_tiling import Tiling

        vae = instantiate_from_config(config.first_stage_config).eval().requires_grad_(False)
        pack_convolutions(vae)
        vae.decode(torch.randn(1, 4, 8, 8, generator=g))  # packs the convolutions
        vae.tiling = Tiling() if mode == "tiled" else None
        z = torch.randn(1, 4, size, size, generator=g)
        call = lambda: vae.decode(z)
    open("/proc/self/clear_refs", "w").write("5")  # the peak so far: what is resident now
    before = status("VmRSS")
    start = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - start
print(json.dumps({"part": part, "size": size, "mode": mode, "seconds": seconds, "rss_before": before,
                  "peak_rss": status("VmHWM"), "peak_above": status("VmHWM") - before,
                  "out_shape": list(out.shape), "finite": bool(torch.isfinite(out).all())}))
"""


def cpu_name() -> str:
    """``lscpu``'s model name (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def measure(case: str) -> dict:
    """One ``part:size:mode`` case in a fresh process."""
    part, size, mode = case.split(":")
    out = subprocess.run([sys.executable, "-c", _CHILD, part, size, mode], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{case} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{case}: {result['seconds']:.1f} s, peak {result['peak_above'] / GB:.2f} GB above "
          f"{result['rss_before'] / GB:.2f} GB", flush=True)
    return result


def tile_count(part: str, size: int) -> int:
    """Tiles of a size x size latent: the UNet's (TiledDenoiser) or the VAE decode's (vae_tiling)."""
    if part == "unet":
        from ldm.sampling.tiled import ALIGN, DEFAULT_OVERLAP, DEFAULT_TILE, tile_starts

        return len(tile_starts(size, DEFAULT_TILE, DEFAULT_OVERLAP, ALIGN)) ** 2
    from ldm.models.vae_tiling import DEFAULT_OVERLAP, DEFAULT_TILE, _starts

    return len(_starts(size, min(DEFAULT_TILE, size), DEFAULT_OVERLAP)) ** 2


def tile_size(part: str) -> int:
    if part == "unet":
        from ldm.sampling.tiled import DEFAULT_TILE
    else:
        from ldm.models.vae_tiling import DEFAULT_TILE
    return DEFAULT_TILE


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(slope per pixel, offset) through the two largest measured sizes (the slope alone from one size)."""
    points = sorted(points)[-2:]
    if len(points) == 1:
        size, value = points[0]
        return value / size**2, 0.0
    (s0, v0), (s1, v1) = points
    slope = (v1 - v0) / (s1**2 - s0**2)
    return slope, v1 - slope * s1**2


def table(results: list[dict]) -> tuple[list[dict], dict]:
    """Rows for every part x size x mode (measured or extrapolated) and the whole runs' per-pixel slopes."""
    got = {(r["part"], r["size"], r["mode"]): r for r in results}
    rows, slopes = [], {}
    for part in ("unet", "vae"):
        whole = [(s, r) for (p, s, m), r in got.items() if p == part and m == "whole"]
        if not whole:
            continue
        t_fit = linear_fit([(s, r["seconds"]) for s, r in whole])
        m_fit = linear_fit([(s, r["peak_above"]) for s, r in whole])
        slopes[part] = m_fit[0]
        tile = tile_size(part)

        def whole_at(n: int) -> tuple[float, float]:
            return t_fit[0] * n * n + t_fit[1], m_fit[0] * n * n + m_fit[1]

        for size in sorted(set(SIZES) | {s for (p, s, _) in got if p == part}):
            for mode in ("whole", "tiled"):
                if (part, size, mode) in got:
                    r = got[(part, size, mode)]
                    seconds, memory, how = r["seconds"], r["peak_above"], "measured"
                elif mode == "whole" or size <= tile:
                    (seconds, memory), how = whole_at(size), "extrapolated (linear in pixels)"
                    if size <= tile and mode == "tiled":
                        how = "= whole (one tile)" if (part, size, "whole") in got else how
                        if (part, size, "whole") in got:
                            seconds, memory = got[(part, size, "whole")]["seconds"], got[(part, size, "whole")][
                                "peak_above"]
                else:
                    one_t, one_m = (got[(part, tile, "whole")]["seconds"], got[(part, tile, "whole")]["peak_above"]) \
                        if (part, tile, "whole") in got else whole_at(tile)
                    out_bytes = 2 * 3 * (4 * size) ** 2 * 4 if part == "vae" else 0  # the output and its accumulator
                    seconds, memory = tile_count(part, size) * one_t, one_m + out_bytes
                    how = f"extrapolated ({tile_count(part, size)} tiles x one {tile} px tile)"
                rows.append({"part": part, "size": size, "mode": mode, "seconds": seconds, "peak_above": memory,
                             "how": how})
    return rows, slopes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="part:size:mode, e.g. unet:128:whole")
    parser.add_argument("--json", default=None, help="write the measurements and the table here")
    args = parser.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu}", flush=True)
    results = [measure(case) for case in args.cases]
    rows, slopes = table(results)
    print("\n| part | low-res -> out | mode | seconds | peak above before (GB) | |\n|---|---|---|---|---|---|")
    for r in rows:
        what = "UNet step (CFG batch 2)" if r["part"] == "unet" else "VAE decode"
        print(f"| {what} | {r['size']} -> {4 * r['size']} px | {r['mode']} | {r['seconds']:.1f} | "
              f"{r['peak_above'] / GB:.2f} | {r['how']} |")
    for part, slope in slopes.items():
        print(f"{part}: {slope:.0f} bytes per low-res pixel (whole runs, fitted)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "measured": results, "table": rows,
                                               "bytes_per_lowres_pixel": slopes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
