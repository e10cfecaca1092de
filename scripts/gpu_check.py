"""Check sdgen's GPU path on a CUDA machine (random weights, no download), in about 5 minutes.

    python3 scripts/gpu_check.py [--quick] [--json out.json]

For each family (SD 1.x, SD 2.x v, SDXL base) on its tiny test config and on the full-size architecture:

* fp16 autocast (the originals' CUDA default) against float32: the UNet outputs' relative difference;
* no NaN / inf in the fp16 images (the SDXL VAE must run in float32, as the originals upcast it);
* channels_last in use for reduced precision, and which scaled-dot-product-attention kernel ran (flash /
  memory-efficient / math, from the profiler);
* images per second of txt2img at 512 and 1024 px (20 steps, guidance), fp16 autocast;
* ``--offload``: the weights in host memory, each part on the GPU only while it runs: the same images, and the
  peak GPU memory with and without it;
* the Karlo prior (tiny, random): its cached text prefix against the whole 81-position pass on the device, a
  25-step sampling there (finite), and fp16 autocast against float32.

Exits 0 with a note when no CUDA device is present; 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.bundled import bundled_path  # noqa: E402
from ldm.checkpoint import build_model_on_meta, load_config  # noqa: E402
from ldm.generation.generate import generate, precision_context  # noqa: E402
from ldm.generation.inference import prepare_for_inference  # noqa: E402
from ldm.generation.request import Settings, make_jobs  # noqa: E402
from ldm.generation.stages import build_stages  # noqa: E402

FAMILIES = {  # name: (tiny config, full config, pixels of the tiny run, factor of the tiny VAE)
    "sd1": ("configs/tests/sd1-tiny.yaml", "configs/stable-diffusion/v1-inference.yaml", 16, 2),
    "sd2v": ("configs/tests/sd2v-tiny.yaml", "configs/stable-diffusion/v2-inference-v.yaml", 32, 2),
    "sdxl": ("configs/tests/sdxl-base-tiny.yaml", "configs/sdxl/sd_xl_base.yaml", 32, 2),
}


def random_model(config: str, device: torch.device) -> torch.nn.Module:
    meta = build_model_on_meta(load_config(bundled_path(config)))
    buffers = {name: b.clone() for name, b in meta.named_buffers() if not b.is_meta}  # schedules, position ids
    model = meta.to_empty(device=device)
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.data.copy_(buffers[name])
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    return model.eval().requires_grad_(False)


def settings_for(model: Any, size: int, factor: int, precision: str, steps: int) -> Settings:
    sdxl = hasattr(model, "conditioner")
    return Settings(sampler="euler" if sdxl else "ddim", steps=steps, grid="sgm" if sdxl else "ddim", scale=7.5,
                    height=size, width=size, factor=factor, precision=precision)


def images(model: Any, settings: Settings, count: int) -> torch.Tensor:
    role = "base" if hasattr(model, "conditioner") else "model"
    stages, _ = build_stages([(role, model)], settings)
    jobs = make_jobs([["a photograph of an astronaut riding a horse"] * count], 1, 42)
    return torch.stack([torch.from_numpy(i.pixels) for i in generate(stages, jobs, settings)]).float()


def unet_agreement(model: Any, size: int, device: torch.device) -> float:
    """max |fp16 autocast - fp32| / max |fp32| of one UNet call."""
    unet = model.model.diffusion_model
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g, device=device)
    t = torch.full((2,), 500, device=device)
    context_dim = next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    ctx = torch.randn(2, 77, context_dim, generator=g, device=device)
    y = (torch.randn(2, unet.label_emb[0][0].in_features, generator=g, device=device)
         if unet.num_classes is not None else None)
    kwargs = {"context": ctx, **({"y": y} if y is not None else {})}
    with torch.no_grad():
        full = unet(x, t, **kwargs)
        with precision_context("autocast", device):
            half = unet(x, t, **kwargs).float()
    return float((half - full).abs().max() / full.abs().max())


def attention_kernels(model: Any, settings: Settings) -> list[str]:
    """The SDPA kernels the profiler saw during a one-step run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        images(model, Settings(**{**settings.__dict__, "steps": 1}), 1)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash" in n.lower() or "efficient_attention" in n)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def offload_check(model: Any, settings: Settings, want: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """The model's images with ``--offload`` (weights in host memory) against ``want``; peak GPU memory of one
    image with and without offload."""
    from ldm.generation.offload import offload_model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images(model, settings, 1)
    resident = peak_gpu_gb(device)
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    offload = offload_model(model, device)
    got = images(model, settings, 1)
    row = {"offload_same_images": bool(torch.equal(got, want)), "peak_gpu_gb": resident,
           "peak_gpu_gb_offload": peak_gpu_gb(device)}
    offload.release()
    return row


def check_family(name: str, quick: bool, device: torch.device) -> dict[str, Any]:
    tiny_config, full_config, tiny_size, tiny_factor = FAMILIES[name]
    out: dict[str, Any] = {}
    configs = [("tiny", tiny_config, tiny_size, tiny_factor)]
    if not quick:
        configs.append(("full", full_config, 1024 if name == "sdxl" else 512, 8))
    for scale, config, size, factor in configs:
        model = random_model(config, device)
        row: dict[str, Any] = {"unet_fp16_vs_fp32": unet_agreement(model, size // factor, device)}
        fp32 = images(model, settings_for(model, size, factor, "full", 4), 1)
        prepare_for_inference(model, "autocast", device)
        half = images(model, settings_for(model, size, factor, "autocast", 4), 1)
        row["finite"] = bool(torch.isfinite(half).all())
        row["image_fp16_vs_fp32_mean_levels"] = float((half - fp32).abs().mean())
        row["channels_last"] = bool(getattr(model.model.diffusion_model, "channels_last", False))
        row["attention_kernels"] = attention_kernels(model, settings_for(model, size, factor, "autocast", 1))
        if scale == "full":
            for px in (512, 1024):
                settings = settings_for(model, px, factor, "autocast", 20)
                images(model, Settings(**{**settings.__dict__, "steps": 2}), 1)  # warm-up
                synchronize(device)
                start = time.perf_counter()
                images(model, settings, 2)
                synchronize(device)
                row[f"images_per_s_{px}"] = 2 / (time.perf_counter() - start)
        row.update(offload_check(model, settings_for(model, size, factor, "autocast", 4), half, device))
        out[scale] = row
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name} {scale}: {json.dumps(row)}", flush=True)
    return out


def prior_check(device: torch.device) -> dict[str, Any]:
    """The tiny Karlo prior on ``device``: cached vs whole pass, a 25-step sampling, fp16 autocast vs float32."""
    from ldm.models.prior.karlo import sample_prior

    prior = build_model_on_meta(load_config(bundled_path("configs/tests/karlo-prior-tiny.yaml"))).to_empty(device=device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        text, seq = torch.randn(2, 16, generator=g).to(device), torch.randn(2, 77, 32, generator=g).to(device)
        mask = torch.ones(2, 77, dtype=torch.bool, device=device)
        x, t = torch.randn(2, 16, generator=g).to(device), torch.tensor([999, 3], device=device)
        prefix = prior.model.encode_text(text, seq, mask)
        cached, whole = prior.model.step(x, t, prefix), prior.model(x, t, text, seq, mask)
        out = sample_prior(prior, prefix.select(torch.tensor([0], device=device)),
                           prefix.select(torch.tensor([1], device=device)), x[:1], steps=25, scale=4.0,
                           noise_sampler=lambda s, sn: torch.randn(1, 16, device=device, dtype=torch.float64))
        with precision_context("fp16" if device.type == "cuda" else "bf16", device):
            half = prior.model.step(x, t, prior.model.encode_text(text, seq, mask))
    row = {"cached_vs_whole": float((cached - whole).abs().max() / whole.abs().max()),
           "sample_finite": bool(torch.isfinite(out).all()),
           "autocast_vs_fp32": float((half.float() - cached).abs().max() / cached.abs().max())}
    print(f"karlo-prior tiny: {json.dumps(row)}", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs only")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (tiny configs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a GPU machine)")
        return 0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"{name} / torch {torch.__version__}", flush=True)
    results = {name: check_family(name, args.quick, device) for name in FAMILIES}
    failed = [f"{name} {scale}" for name, rows in results.items() for scale, row in rows.items()
              if not row["finite"] or row["unet_fp16_vs_fp32"] > 0.05
              or not row["offload_same_images"] or (device.type == "cuda" and not row["channels_last"])]
    prior = prior_check(device)
    if not prior["sample_finite"] or prior["cached_vs_whole"] > 1e-3 or prior["autocast_vs_fp32"] > 0.05:
        failed.append("karlo-prior")
    results["karlo-prior"] = prior
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
