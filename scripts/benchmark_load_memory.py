"""Peak host memory of loading a full-size SDXL base checkpoint, relative to the file's size.

Writes a synthetic ``sd_xl_base_0.9``-shaped float16 .safetensors file (every key and shape of the released
file, about 6.9 GB, random N(0, 0.02^2) values, the CLIP ``position_ids`` buffer as int64 the way transformers
4.19 saved it, no ``denoiser.sigmas`` as the released file is believed to lack it) into a temporary folder,
tensor by tensor so the writer never holds the whole file. A fresh Python process then loads it with
``ldm.checkpoint.load_model(config, file, device="cpu", dtype=torch.float16)``, reads every weight once (as a
forward pass would, so that lazily mapped file pages are counted too) and reports its peak resident set size
(VmHWM, which counts anonymous memory and mapped file pages alike) over the file size. The file is deleted
afterwards unless ``--keep`` is given.

    python scripts/benchmark_load_memory.py [--config configs/sdxl/sd_xl_base.yaml] [--dir /tmp] [--keep]
    python scripts/benchmark_load_memory.py --config configs/stable-diffusion/v1-inference.yaml --dtype float32 \
        --format ckpt        # an SD 1.x float32 .ckpt (torch zip pickle with "state_dict"), 4.3 GB

Needs about 7 GB of free disk and, for the loader under test, about 1.3 x 7 GB of free RAM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmark_load_memory")

CLIP_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
SKIPPED_KEYS = ("denoiser.sigmas",)
TARGET_RATIO = 1.1  # goal: the whole process's peak resident memory <= 1.1 x the file

_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64"}

# Runs in the measured process: only the imports the CLI needs, then the load.
_CHILD = r"""
import json, sys, time
from ldm.util import process_memory as status
python_rss = status("VmRSS")
import torch
torch_rss = status("VmRSS")
from ldm.checkpoint import build_model_on_meta, load_model

config, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
build_model_on_meta(config)  # imports the text encoders' libraries (transformers, open_clip) the config builds
before = status("VmRSS")
start = time.perf_counter()
model = load_model(config, path, device="cpu", dtype=dtype)
seconds = time.perf_counter() - start
peak_load = status("VmHWM")
tensors = list(model.parameters()) + list(model.buffers())
n_bytes = sum(t.numel() * t.element_size() for t in tensors)
# read every weight once, as a forward pass would: memory-mapped pages count from here on (a reduction in the
# tensor's own dtype: no temporary copy that would add to the peak)
for t in tensors:
    if t.numel():
        t.amax()
print(json.dumps({"rss_python": python_rss, "rss_after_import_torch": torch_rss, "rss_before_load": before,
                  "peak_rss_during_load": peak_load, "peak_rss": status("VmHWM"),
                  "rss_after_reading_all_weights": status("VmRSS"), "model_bytes": n_bytes, "load_seconds": seconds}))
"""


def tensor_specs(config: str, dtype: str = "float16") -> list[tuple[str, list[int], str]]:
    """(key, shape, dtype name) of every tensor of the released file, from the model built on meta."""
    from ldm.checkpoint import build_model_on_meta

    model = build_model_on_meta(config)
    specs = [(k, list(v.shape), dtype) for k, v in model.state_dict().items() if k not in SKIPPED_KEYS]
    if any(k.startswith("conditioner.embedders.0.transformer.") for k, _, _ in specs):
        specs.append((CLIP_POSITION_IDS, [1, 77], "int64"))
    del model
    return specs


def write_synthetic_safetensors(path: Path, specs: list[tuple[str, list[int], str]], seed: int = 0) -> int:
    """Write a .safetensors file tensor by tensor (header first, then each tensor's bytes); returns its size."""
    import numpy as np
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt", "note": "synthetic sdgen load benchmark"}}
    offset = 0
    for key, shape, dtype in specs:
        itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in specs:
            if dtype == "int64":
                tensor = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape)
            else:
                tensor = (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))
            f.write(tensor.contiguous().numpy().tobytes())
            del tensor
    return path.stat().st_size


def write_synthetic_ckpt(path: Path, specs: list[tuple[str, list[int], str]], seed: int = 0) -> int:
    """Write a pickle ``.ckpt`` ({"state_dict": ...}, torch's zip format, as the original training saved it)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {key: (torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64).reshape(shape)
                   if dtype == "int64" else (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype)))
             for key, shape, dtype in specs}
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path.stat().st_size


def measure(config: str, path: Path, dtype: str = "float16") -> dict:
    """Load ``path`` in a fresh process and return its memory figures."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, config, str(path), dtype], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the loading process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "sdxl" / "sd_xl_base.yaml"))
    parser.add_argument("--dir", default=None, help="where to write the synthetic file (a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic file")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="the file's weights, loaded in the same dtype")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    folder = Path(tempfile.mkdtemp(prefix="sdgen-load-bench-", dir=args.dir))
    path = folder / f"{Path(args.config).stem}-synthetic.{args.format}"
    try:
        start = time.perf_counter()
        specs = tensor_specs(args.config, args.dtype)
        writer = write_synthetic_ckpt if args.format == "ckpt" else write_synthetic_safetensors
        file_size = writer(path, specs)
        logger.info("wrote %s: %d tensors, %.2f GB in %.0f s", path, len(specs), file_size / 1e9,
                    time.perf_counter() - start)
        figures = measure(args.config, path, args.dtype)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            folder.rmdir()
    ratio = figures["peak_rss"] / file_size
    over_baseline = (figures["peak_rss"] - figures["rss_before_load"]) / file_size
    result = {"file_bytes": file_size, **figures, "peak_rss_over_file_size": round(ratio, 3),
              "peak_minus_baseline_over_file_size": round(over_baseline, 3), "target": TARGET_RATIO}
    print(json.dumps(result, indent=2))
    logger.info("peak RSS %.2f GB for a %.2f GB file: %.2f x the file size (target <= %.1f); %.3f x counting only "
                "the load; before it the process held %.2f GB (Python %.2f, import torch %.2f, the text encoders' "
                "libraries %.2f); load took %.0f s", figures["peak_rss"] / 1e9, file_size / 1e9, ratio, TARGET_RATIO,
                over_baseline, figures["rss_before_load"] / 1e9, figures["rss_python"] / 1e9,
                (figures["rss_after_import_torch"] - figures["rss_python"]) / 1e9,
                (figures["rss_before_load"] - figures["rss_after_import_torch"]) / 1e9, figures["load_seconds"])
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
