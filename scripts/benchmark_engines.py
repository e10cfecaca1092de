"""sdgen's engines against each other and against diffusers, on the same random full-size SD 1.x weights (CPU).

    pip install -e ".[openvino,bench]"
    python3 scripts/benchmark_engines.py                    # UNet step and end-to-end per step, fp32 (and bf16)
    python3 scripts/benchmark_engines.py --json results.json
    python3 scripts/benchmark_engines.py --roofline         # the FLOPs against this CPU's float32 GEMM rate

Rows (512 x 512, classifier-free guidance):
* UNet step: one CFG forward (batch 2, 64 x 64 latents) of sdgen's UNet with ``--engine torch`` (packed oneDNN
  convolutions, as ``--precision full`` / ``bf16`` run it), ``--engine openvino`` (the converted and compiled
  network), and diffusers' ``UNet2DConditionModel`` in its best eager configuration (contiguous or channels_last,
  the faster). Medians of ``--repeats`` alternated runs after a warm-up.
* End to end per step: one txt2img image, ``--steps`` DDIM steps (text encoding, sampling, VAE decode) divided by
  the steps, for both sdgen engines and diffusers' ``StableDiffusionPipeline``. optimum-intel's
  ``OVStableDiffusionPipeline`` (exported offline from the same weights) is measured by scripts/benchmark_optimum.py
  in an environment of its own.
* The conversion: time and the process's peak memory while the UNet is converted.

bf16 rows run only where the CPU computes bfloat16 natively (OpenVINO's BF16 capability). The weights are built
with a fixed seed (scripts/benchmark_diffusers.py ``random_sd1``), so every row computes the same network.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_diffusers import (  # noqa: E402
    alternate,
    diffusers_models,
    diffusers_txt2img,
    prepared,
    random_sd1,
    sdgen_txt2img,
    timed,
    unet_inputs,
)


def cpu_name() -> str:
    """``lscpu``'s model name (and the AVX-512 / AMX flags that decide the kernels)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    kinds = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()] or ["AVX2 only"]
    return f"{name} ({', '.join(kinds)}), {torch.get_num_threads()} threads"


def peak_gb() -> float:
    from ldm.util import process_memory

    return process_memory("VmHWM") / 1e9


def ov_dynamic(model: Any, precision: str) -> Any:
    """The converted UNet compiled once with dynamic shapes (what the engine does not do: it compiles per shape)."""
    import openvino as ov

    from ldm.engines.ov_engine import inference_precision

    network = model.model.diffusion_model.network
    return ov.Core().compile_model(network._model, "CPU", {"INFERENCE_PRECISION_HINT": inference_precision(precision),
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})


def roofline(args: argparse.Namespace) -> None:
    """What this CPU can do at best: the SD 1.x UNet's and VAE decoder's floating-point operations at 512 px
    (torch's FLOP counter on the meta device: convolutions and matrix products, 2 per multiply-add) against the
    best float32 rate measured here (torch and OpenVINO 2048 x 2048 matrix products, a UNet-sized 3x3
    convolution; best of 3 each). Their quotient is a lower bound on a step's time for any engine that computes
    the same products in float32 (no fast-convolution algorithms)."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.checkpoint import load_config
    from ldm.util import instantiate_from_config

    params = load_config("configs/stable-diffusion/v1-inference.yaml").model.params
    with torch.device("meta"):
        unet = instantiate_from_config(params.unet_config)
        decoder = instantiate_from_config(params.first_stage_config)
        with FlopCounterMode(display=False) as unet_count:
            unet(torch.randn(2, 4, 64, 64), torch.tensor([999, 999]), context=torch.randn(2, 77, 768))
        with FlopCounterMode(display=False) as vae_count:
            decoder.decode(torch.randn(1, 4, 64, 64))
    flops = {"unet_cfg_step": unet_count.get_total_flops(), "vae_decode": vae_count.get_total_flops()}
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    param = ops.parameter([n, n], np.float32)
    compiled = ov.Core().compile_model(ov.Model([ops.matmul(param, ops.constant(b.numpy()), False, False)], [param]),
                                       "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                               "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    conv, image = torch.nn.Conv2d(320, 320, 3, padding=1).eval(), torch.randn(2, 320, 64, 64)  # the UNet's first level
    conv_flops = 2 * image.numel() * 320 * 9
    rates = {}
    for name, (fn, work) in {"torch": (lambda: a @ b, 2 * n**3), "openvino": (lambda: compiled([a.numpy()]), 2 * n**3),
                             "torch conv3x3": (lambda: conv(image), conv_flops)}.items():
        with torch.no_grad():
            fn()
            rates[name] = work / min(timed(fn) for _ in range(3))
    best = max(rates.values())
    report = {"cpu": cpu_name(), "flops": flops, "sgemm_flops_per_s": rates,
              "lower_bound_s": {k: v / best for k, v in flops.items()}}
    print(f"{cpu_name()}; float32 2048^2 matrix product: torch {rates['torch'] / 1e9:.1f}, openvino "
          f"{rates['openvino'] / 1e9:.1f} GFLOP/s; 3x3 convolution 320 -> 320 channels at 64 x 64, batch 2: "
          f"{rates['torch conv3x3'] / 1e9:.1f} GFLOP/s")
    for k, v in flops.items():
        print(f"  {k}: {v / 1e12:.3f} TFLOP -> at least {v / best:.1f} s at the best rate")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def sdxl_memory(args: argparse.Namespace) -> None:
    """The SDXL base UNet (configs/sdxl/sd_xl_base.yaml, random float32 weights): conversion and one CFG step at
    1024 px through the engine; the process's peak resident memory."""
    from types import SimpleNamespace

    from ldm.checkpoint import build_model_on_meta, load_config
    from ldm.engines.ov_engine import apply_openvino
    from ldm.util import instantiate_from_config

    os.environ.setdefault("SDGEN_OPENVINO_CACHE", tempfile.mkdtemp(prefix="sdgen-ov-bench-"))
    config = load_config("configs/sdxl/sd_xl_base.yaml").model.params.network_config
    with torch.device("meta"):
        unet = instantiate_from_config(config)
    unet = unet.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in unet.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    built = peak_gb()
    holder = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    del unet
    apply_openvino(holder, "full", ["benchmark random sdxl base seed 0"])
    x, t = torch.randn(2, 4, 128, 128, generator=g), torch.tensor([999.0, 999.0])
    ctx, y = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        holder.model.diffusion_model(x, t, context=ctx, y=y)
    first = time.perf_counter() - start
    with torch.no_grad():
        step = timed(lambda: holder.model.diffusion_model(x, t, context=ctx, y=y))
    print(f"{cpu_name()}; SDXL base UNet, float32 weights built: peak {built:.1f} GB; convert + save + compile + first "
          f"step {first:.0f} s; peak {peak_gb():.1f} GB; a CFG step at 1024 px {step:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "built_peak_gb": built, "first_call_s": first,
                                               "peak_gb": peak_gb(), "step_s": step}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-only", action="store_true",
                        help="only the end-to-end rows (one copy of each network: fits 24 GB with room)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sdxl", action="store_true",
                        help="instead: convert the full-size SDXL base UNet and run one step at 1024 px (peak memory)")
    parser.add_argument("--roofline", action="store_true",
                        help="instead: the networks' FLOPs against this CPU's float32 matrix-product rate")
    args = parser.parse_args()
    if args.roofline:
        roofline(args)
        return
    if args.sdxl:
        sdxl_memory(args)
        return
    from ldm.engines.ov_engine import apply_openvino, cpu_capabilities, openvino_version
    from ldm.generation.inference import prepare_for_inference

    os.environ.setdefault("SDGEN_OPENVINO_CACHE", tempfile.mkdtemp(prefix="sdgen-ov-bench-"))
    precisions = ["fp32"] + (["bf16"] if "BF16" in cpu_capabilities() else [])
    report: dict[str, Any] = {"cpu": cpu_name(), "torch": torch.__version__, "openvino": openvino_version(),
                              "precisions": precisions}
    print(f"{report['cpu']}; torch {torch.__version__}, openvino {report['openvino']}")
    if "bf16" not in precisions:
        print("bf16: not measured (OpenVINO reports no BF16 on this CPU; --precision bf16 --engine openvino refuses)")
    cpu = torch.device("cpu")
    x, t, ctx = unet_inputs(2, 512, torch.float32, False)
    for precision in precisions:
        name = "full" if precision == "fp32" else "bf16"
        # the OpenVINO model first: its conversion's peak memory is measured before the other copies exist
        ours_ov = prepare_for_inference(random_sd1(), name, cpu, engine="openvino")
        apply_openvino(ours_ov, name, [f"benchmark random sd1 seed 0 {precision}"])
        start = time.perf_counter()
        with torch.no_grad():
            ours_ov.model.diffusion_model(x, t, context=ctx)
        conversion = {"seconds_first_call": time.perf_counter() - start, "peak_gb": peak_gb()}
        gc.collect()
        ours = prepare_for_inference(random_sd1(), name, cpu)
        d_unet, d_vae = diffusers_models(ours if precision == "fp32" else random_sd1())
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        from ldm.generation.generate import precision_context

        def sdgen_torch():
            with torch.no_grad(), precision_context(name, cpu):
                return ours.model.diffusion_model(x, t, context=ctx)

        def sdgen_ov():
            with torch.no_grad():
                return ours_ov.model.diffusion_model(x, t, context=ctx)

        dynamic = ov_dynamic(ours_ov, name) if not args.e2e_only else None

        def sdgen_ov_dynamic():
            return dynamic([x, t.float(), ctx])

        runs = {"sdgen torch": sdgen_torch, "sdgen openvino": sdgen_ov, "openvino dynamic shapes": sdgen_ov_dynamic}
        if args.e2e_only:
            runs = {}
        for layout in (False, True):
            d = prepared(d_unet, dtype, layout)
            xd, td, cd = unet_inputs(2, 512, dtype, layout)
            runs[f"diffusers{' channels_last' if layout else ''}"] = (
                lambda d=d, xd=xd, td=td, cd=cd: d(xd, td, encoder_hidden_states=cd).sample)
        if args.e2e_only:
            dynamic = None
            step, best, layout = {}, 1.0, False  # contiguous: diffusers' faster layout in fp32 on this CPU
        else:
            with torch.no_grad():
                step = alternate(runs, args.repeats)
            best = min(step["diffusers"], step["diffusers channels_last"])
            layout = step["diffusers channels_last"] < step["diffusers"]
        row: dict[str, Any] = {"conversion": conversion, "unet_step": {**step, "diffusers best": best}}
        if step:
            print(f"\n{precision} UNet step, CFG batch 2, 512 px (median of {args.repeats}):")
            for k, v in row["unet_step"].items():
                print(f"  {k:24s} {v:7.2f} s   {v / best:5.2f}x diffusers' best")
        print(f"  openvino: the first call (convert, save, compile) took {conversion['seconds_first_call']:.0f} s, "
              f"process peak {conversion['peak_gb']:.1f} GB")
        runs.clear()  # the diffusers copies in both layouts: free them before the end-to-end copies
        gc.collect()
        if not args.skip_e2e:
            e2e = {}
            with torch.no_grad():  # warm-up: the OpenVINO VAE decoder converts and compiles on its first call
                ours_ov.decode_first_stage(torch.randn(1, 4, 64, 64))
                ours.decode_first_stage(torch.randn(1, 4, 64, 64))
                e2e["sdgen torch"] = timed(lambda: sdgen_txt2img(ours, precision, args.steps)) / args.steps
                e2e["sdgen openvino"] = timed(lambda: sdgen_txt2img(ours_ov, precision, args.steps)) / args.steps
                unet, vae = ((d_unet, d_vae) if not layout and dtype == torch.float32 else
                             (prepared(d_unet, dtype, layout), prepared(d_vae, dtype, layout)))
                ours.cond_stage_model.transformer.to(dtype)
                e2e["diffusers best"] = timed(lambda: diffusers_txt2img(ours, unet, vae, dtype, args.steps)) / args.steps
            note = ("optimum-intel's OVStableDiffusionPipeline: scripts/benchmark_optimum.py (its own environment; "
                    "exported from these weights)")
            row["end_to_end_per_step"] = e2e
            print(f"\n{precision} end to end, {args.steps} DDIM steps, per step:")
            for k, v in e2e.items():
                if v is not None:
                    print(f"  {k:24s} {v:7.2f} s   {v / e2e['diffusers best']:5.2f}x diffusers' best")
            print(f"  {note}")
            row["note"] = note
        report[precision] = row
        del ours, ours_ov, d_unet, d_vae
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
