"""sdgen against diffusers, side by side in one process, on the same random full-size SD 1.x weights.

    pip install -e ".[bench]"            # diffusers, for this benchmark only
    python3 scripts/benchmark_diffusers.py                 # UNet step and end-to-end, fp32 and bf16, 512 px
    python3 scripts/benchmark_diffusers.py --scaling --plot scaling.png   # step time vs size and batch

The SD 1.x architecture (configs/stable-diffusion/v1-inference.yaml) is built with seeded random weights; the
same tensors are copied into diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` (renamed, checked by
comparing the UNet outputs) and the text encoder is shared. Each measurement alternates the two libraries,
``--repeats`` times after a warm-up (end to end: ``--e2e-repeats`` times, the networks already warm), and prints
medians and the ratio sdgen / diffusers (below 1: sdgen faster).

* UNet step: one classifier-free-guidance forward (batch 2) at 512 x 512 (64 x 64 latents).
* End to end: txt2img of one image at 512 x 512, 20 DDIM steps with guidance: text encoding, sampling, VAE
  decode (sdgen: its generation loop; diffusers: ``StableDiffusionPipeline`` with the prompt embeddings of
  the same text encoder, whose time is added).

For each precision diffusers runs in its best eager configuration (weights in that dtype; contiguous or
channels_last, whichever is faster); sdgen runs as ``--precision full`` / ``--precision bf16`` do.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any, Callable, Optional

import torch

from ldm.adapters.lora_keys import _unet_blocks, diffusers_unet_name
from ldm.bundled import bundled_path
from ldm.checkpoint import build_model_on_meta, load_config

CONFIG = "configs/stable-diffusion/v1-inference.yaml"


# ----------------------------------------------------------------------------- the same weights in both


def random_sd1(seed: int = 0) -> torch.nn.Module:
    """The SD 1.x model with seeded random weights (N(0, 0.02^2); norm scales 1)."""
    meta = build_model_on_meta(load_config(bundled_path(CONFIG)))
    buffers = {name: b.clone() for name, b in meta.named_buffers() if not b.is_meta}  # schedules, position ids
    model = meta.to_empty(device="cpu")
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.data.copy_(buffers[name])
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim == 1:
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval().requires_grad_(False)
    return model


def unet_to_diffusers(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """sdgen's (original) UNet state_dict renamed to diffusers' ``UNet2DConditionModel`` names."""
    blocks = _unet_blocks(unet)
    out = {}
    for key, value in unet.state_dict().items():
        path, _, param = key.rpartition(".")
        renamed = diffusers_unet_name(path, blocks)
        if renamed is None:
            raise KeyError(f"no diffusers name for {key}")
        out[f"{renamed}.{param}"] = value
    return out


def vae_to_diffusers(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The original AutoencoderKL state_dict renamed to diffusers' ``AutoencoderKL`` names."""
    import re

    levels = len(vae.decoder.up)
    rules = [
        (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", lambda m: f"{m[1]}.mid_block.attentions.0.group_norm."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_{m[2]}."),
        (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_out.0."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
        (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
        (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
    ]
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        if ".mid_block.attentions.0." in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 convolutions there are linear layers in diffusers
        out[new] = value
    return out


def diffusers_models(model: torch.nn.Module) -> tuple[Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    unet.load_state_dict(unet_to_diffusers(model.model.diffusion_model), strict=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.load_state_dict(vae_to_diffusers(model.first_stage_model), strict=True)
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn ``repeats`` times after one warm-up each."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def unet_inputs(batch: int, size: int, dtype: torch.dtype, channels_last: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500, dtype=torch.long)
    ctx = torch.randn(batch, 77, 768, generator=g).to(dtype)
    return x, t, ctx


def prepared(module: torch.nn.Module, dtype: torch.dtype, channels_last: bool) -> torch.nn.Module:
    """A copy of ``module`` in ``dtype`` and the memory format asked for."""
    module = copy.deepcopy(module).to(dtype)
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def step_runs(model, d_unet, precision: str, batch: int, size: int) -> dict[str, Callable[[], Any]]:
    """sdgen's UNet as ``--precision full`` / ``bf16`` runs it (``model`` prepared by
    :func:`ldm.generation.inference.prepare_for_inference`), and diffusers' in both memory formats."""
    from ldm.generation.generate import precision_context

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = model.model.diffusion_model
    x, t, ctx = unet_inputs(batch, size, torch.float32, False)
    context = precision_context("bf16" if precision == "bf16" else "full", torch.device("cpu"))

    def ours():
        with context:
            return unet(x, t, context=ctx)

    runs = {"sdgen": ours}
    for layout in (False, True):
        d = prepared(d_unet, dtype, layout)
        xd, td, cd = unet_inputs(batch, size, dtype, layout)
        runs[f"diffusers{' channels_last' if layout else ''}"] = (
            lambda d=d, xd=xd, td=td, cd=cd: d(xd, td, encoder_hidden_states=cd).sample)
    return runs


def sdgen_txt2img(model, precision: str, steps: int, size: int = 512, batch: int = 1, n_iter: int = 1,
                  per_batch: Optional[list] = None):
    """sdgen's generation loop on ``model``: ``n_iter`` batches of ``batch`` images (DDIM, scale 7.5)."""
    from ldm.generation.generate import generate
    from ldm.generation.request import Settings, make_jobs
    from ldm.generation.stages import build_stages

    settings = Settings(sampler="ddim", steps=steps, grid="ddim", scale=7.5, height=size, width=size, factor=8,
                        precision="bf16" if precision == "bf16" else "full")
    stages, _ = build_stages([("model", model)], settings)
    jobs = make_jobs([["a photograph of an astronaut riding a horse"] * batch], n_iter, 42)
    start = time.perf_counter()
    for image in generate(stages, jobs, settings):
        if per_batch is not None and image.job.position == len(jobs[image.job.batch]) - 1:
            per_batch.append((time.perf_counter() - start, rss_gb()))
            start = time.perf_counter()


def rss_gb() -> float:
    """This process's resident memory now, GB (Linux /proc)."""
    from ldm.util import process_memory

    return process_memory("VmRSS") / 1e9


def diffusers_txt2img(model, d_unet, d_vae, dtype: torch.dtype, steps: int, size: int = 512) -> None:
    """diffusers' ``StableDiffusionPipeline`` with DDIM, the embeddings from the shared text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    encoder = model.cond_stage_model
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=d_vae, text_encoder=encoder.transformer, tokenizer=None, unet=d_unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = encoder.tokenize(["a photograph of an astronaut riding a horse", ""])
    hidden = encoder.transformer(input_ids=ids).last_hidden_state.to(dtype)
    pipe(prompt_embeds=hidden[:1], negative_prompt_embeds=hidden[1:], num_inference_steps=steps,
         guidance_scale=7.5, height=size, width=size, output_type="np",
         generator=torch.Generator().manual_seed(42))


def end_to_end(model, d_unet, d_vae, precision: str, steps: int, repeats: int, layout: bool) -> dict[str, float]:
    """Median seconds of one 512 px txt2img in each library, alternating (the UNets are warm from the step
    measurement, so no warm-up run); diffusers in its faster memory format (``layout``: channels_last)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet, vae = prepared(d_unet, dtype, layout), prepared(d_vae, dtype, layout)
    model.cond_stage_model.transformer.to(dtype)  # diffusers' text encoder in its dtype (shared module)

    def theirs():
        diffusers_txt2img(model, unet, vae, dtype, steps)

    def ours():
        model.cond_stage_model.transformer.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        sdgen_txt2img(model, precision, steps)
        model.cond_stage_model.transformer.to(dtype)

    times: dict[str, list[float]] = {"sdgen": [], "diffusers": []}
    for _ in range(repeats):
        times["sdgen"].append(timed(ours))
        times["diffusers"].append(timed(theirs))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {**medians, "ratio": medians["sdgen"] / medians["diffusers"]}


def scaling(model, d_unet, repeats: int, plot: Optional[str], layout: bool) -> dict[str, Any]:
    """bf16 UNet step time (CFG batch = 2 x images) against image size and batch size: sdgen, and diffusers in
    its faster memory format."""
    from ldm.generation.generate import precision_context

    table: dict[str, Any] = {"size": {}, "batch": {}}
    unet = prepared(d_unet, torch.bfloat16, layout)
    ours = model.model.diffusion_model

    def pair(batch: int, size: int) -> dict[str, float]:
        x, t, ctx = unet_inputs(batch, size, torch.float32, False)
        xd, td, cd = unet_inputs(batch, size, torch.bfloat16, layout)

        def sdgen_step():
            with precision_context("bf16", torch.device("cpu")):
                ours(x, t, context=ctx)

        return alternate({"sdgen": sdgen_step, "diffusers": lambda: unet(xd, td, encoder_hidden_states=cd)}, repeats)

    for size in (256, 512, 768, 1024):
        table["size"][size] = pair(2, size)
        print(f"  {size} px: " + ", ".join(f"{k} {v:.2f} s" for k, v in table["size"][size].items()), flush=True)
    for batch in (1, 2, 4):
        table["batch"][batch] = {k: v / batch for k, v in pair(2 * batch, 512).items()}
        print(f"  batch {batch}: per image " + ", ".join(f"{k} {v:.2f} s" for k, v in table["batch"][batch].items()),
              flush=True)
    if plot:
        draw_plot(table, plot)
    return table


def draw_plot(table: dict[str, Any], path: str) -> None:
    """Two small line charts (step time vs size; time per image vs batch) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (820, 340), "white")
    draw = ImageDraw.Draw(image)
    colours = {"sdgen": (200, 30, 30), "diffusers": (30, 80, 200)}
    for panel, (key, title, unit) in enumerate((("size", "UNet step (bf16, CFG batch 2) vs image size", "px"),
                                                 ("batch", "time per image vs batch size (512 px)", "images"))):
        x0, y0, w, h = 60 + panel * 400, 40, 320, 240
        draw.text((x0, 10), title, fill="black")
        draw.rectangle((x0, y0, x0 + w, y0 + h), outline="black")
        xs = list(table[key])
        top = max(v for row in table[key].values() for v in row.values()) * 1.1
        for tick in range(5):
            value = top * tick / 4
            y = y0 + h - h * tick / 4
            draw.text((x0 - 45, y - 6), f"{value:.1f} s", fill="black")
        for n, x in enumerate(xs):
            draw.text((x0 + w * n / max(len(xs) - 1, 1) - 10, y0 + h + 6), f"{x}", fill="black")
        draw.text((x0 + w // 2 - 20, y0 + h + 22), unit, fill="black")
        for lib, colour in colours.items():
            points = [(x0 + w * n / max(len(xs) - 1, 1), y0 + h - h * table[key][x][lib] / top)
                      for n, x in enumerate(xs)]
            draw.line(points, fill=colour, width=3)
            for px, py in points:
                draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        for n, (lib, colour) in enumerate(colours.items()):
            draw.text((x0 + 10, y0 + 10 + 14 * n), lib, fill=colour)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--e2e-repeats", type=int, default=1)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--precisions", default="fp32,bf16", help="which of fp32, bf16 to measure")
    parser.add_argument("--scaling", action="store_true", help="step time vs size (256..1024) and batch (1, 2, 4)")
    parser.add_argument("--n-iter", type=int, default=0, help="also run sdgen bf16 for this many batches and "
                        "print each batch's time and the resident memory after it")
    parser.add_argument("--plot", default=None, help="write the scaling plot to this PNG")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = random_sd1()
    d_unet, d_vae = diffusers_models(model)
    with torch.no_grad():
        x, t, ctx = unet_inputs(1, 256, torch.float32, False)
        ours = model.model.diffusion_model(x, t, context=ctx)
        theirs = d_unet(x, t, encoder_hidden_states=ctx).sample
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"same weights: UNet outputs agree to {rel:.1e} (max |difference| / max |output|), "
          f"{torch.get_num_threads()} threads")
    results: dict[str, Any] = {"unet_agreement": rel, "threads": torch.get_num_threads()}
    layouts: dict[str, bool] = {}
    with torch.no_grad():
        for precision in args.precisions.split(","):
            from ldm.generation.inference import prepare_for_inference

            prepare_for_inference(model, "bf16" if precision == "bf16" else "full", torch.device("cpu"))
            medians = alternate(step_runs(model, d_unet, precision, 2, 512), args.repeats)
            best = min(v for k, v in medians.items() if k.startswith("diffusers"))
            layouts[precision] = medians["diffusers channels_last"] < medians["diffusers"]
            results[f"step_{precision}"] = {**medians, "ratio": medians["sdgen"] / best}
            print(f"UNet step {precision} (batch 2, 512 px): " + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items())
                  + f"; sdgen / best diffusers = {medians['sdgen'] / best:.2f}", flush=True)
            if not args.skip_e2e:
                medians = end_to_end(model, d_unet, d_vae, precision, args.steps, args.e2e_repeats, layouts[precision])
                results[f"e2e_{precision}"] = medians
                print(f"txt2img {precision} ({args.steps} steps, 512 px): sdgen {medians['sdgen']:.1f} s, diffusers "
                      f"{medians['diffusers']:.1f} s; ratio {medians['ratio']:.2f}", flush=True)
        if args.scaling:
            print("scaling (bf16):", flush=True)
            results["scaling"] = scaling(model, d_unet, args.repeats, args.plot, layouts.get("bf16", False))
        if args.n_iter:
            per_batch: list = []
            sdgen_txt2img(model, "bf16", args.steps, n_iter=args.n_iter, per_batch=per_batch)
            results["n_iter"] = per_batch
            print("sdgen bf16, batch by batch: " + ", ".join(f"{t:.1f} s / {m:.2f} GB" for t, m in per_batch))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
