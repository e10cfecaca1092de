#!/usr/bin/env python3
"""Images per second of the demo model with 1 and 2 processes on this machine (``sdgen txt2img --devices N``).

    python scripts/benchmark_processes.py                 # 24 images, 25 steps, 1 and 2 processes
    python scripts/benchmark_processes.py --images 48 --devices 1 2 4

For each process count the same run is made in a fresh output folder; the script prints, as JSON per line, the
wall time of the whole command (start-up and model loading included) and the generation throughput (from the run
manifest's start to its end), and checks that every count gave the same images (at one thread per process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image


def run(devices: int, images: int, steps: int, batch: int, threads: int | None, folder: Path) -> dict:
    command = [sys.executable, "-m", "ldm.cli.app", "txt2img", "a red circle on a white background", "--steps",
               str(steps), "--n_samples", str(batch), "--n_iter", str(images // batch), "--devices", str(devices),
               "--outdir", str(folder), "--skip_grid"]
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"sdgen failed ({devices} processes): {result.stderr.strip()[-400:]}")
    manifest = json.loads((folder / "run-0000.json").read_text())
    seconds = (datetime.fromisoformat(manifest["finished"]) - datetime.fromisoformat(manifest["created"])).total_seconds()
    return {"processes": devices, "images": images, "wall_s": round(wall, 2), "wall_images_per_s": round(images / wall, 3),
            "generation_s": seconds, "generation_images_per_s": round(images / max(seconds, 1e-9), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2, help="--n_samples")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, help="threads per process (default: cores / processes)")
    args = parser.parse_args()
    if args.images % args.batch:
        parser.error("--images must be a multiple of --batch")
    pixels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.devices:
            folder = Path(tmp) / f"p{devices}"
            print(json.dumps(run(devices, args.images, args.steps, args.batch, args.threads, folder)), flush=True)
            pixels[devices] = [np.asarray(Image.open(p)) for p in sorted((folder / "samples").glob("*.png"))]
    first = pixels[args.devices[0]]
    same = {d: all(np.array_equal(a, b) for a, b in zip(first, p)) for d, p in pixels.items()}
    print(json.dumps({"identical_images": same, "threads_per_process": args.threads or "cores / processes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
