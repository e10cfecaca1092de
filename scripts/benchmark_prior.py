"""Time the Karlo prior against the unCLIP-L decoder on full-size random weights (no download).

Builds the released prior (configs/karlo/prior_1B_vit_l.yaml, 1.02e9 parameters) and the unCLIP-L decoder's UNet
(configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml) with random weights, then measures, per precision:

* prior: the text prefix (78 positions, once per prompt and once for the empty prompt) plus 25 guided steps of the
  last three positions against it, for a batch of ``--batch`` images; and, for comparison, steps computed on all
  81 positions (no prefix cache): ``--uncached-steps`` of them, scaled to 25;
* decoder: one UNet step at 768 x 768 (latents 96 x 96) on the guidance batch, times the 20 steps of the default;
* memory: the process's peak resident memory after each part.

    python scripts/benchmark_prior.py --batch 2 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ldm.bundled import bundled_path
from ldm.checkpoint import build_model_on_meta, load_config
from ldm.models.prior.karlo import sample_prior
from ldm.util import process_memory

GB = 1e9


def materialize(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Random N(0, 0.02) weights (LayerNorms 1 / 0) for a module built on the meta device."""
    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "final_ln.weight", "norm.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.to(dtype).eval()


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_prior(prior, batch: int, repeats: int, autocast: bool, uncached_steps: int) -> dict:
    g = torch.Generator().manual_seed(1)
    pooled, states = torch.randn(2, 768, generator=g), torch.randn(2, 77, 768, generator=g)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[0, :12], mask[1, :2] = True, True  # a 10-token prompt and the empty prompt
    noise = torch.randn(batch, 768, generator=g)
    rows = torch.tensor([0] * batch), torch.tensor([1] * batch)

    def cached():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            prefix = prior.model.encode_text(pooled, states, mask)
            sample_prior(prior, prefix.select(rows[0]), prefix.select(rows[1]), noise, steps=25, scale=4.0,
                         noise_sampler=lambda s, sn: torch.randn(batch, 768, generator=g))

    def uncached():
        text = torch.cat([pooled[rows[0]], pooled[rows[1]]]), torch.cat([states[rows[0]], states[rows[1]]])
        m = torch.cat([mask[rows[0]], mask[rows[1]]])
        t = torch.full((2 * batch,), 500)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            for _ in range(uncached_steps):
                prior.model(torch.cat([noise, noise]), t, *text, m)

    out = {"prior_25_steps_s": best(cached, repeats)}
    if uncached_steps:
        out["prior_25_steps_uncached_s"] = best(uncached, 1) * 25 / uncached_steps
    return out


def time_unet(unet, batch: int, repeats: int, autocast: bool) -> float:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * batch, 4, 96, 96, generator=g)
    t = torch.full((2 * batch,), 500)
    ctx, y = torch.randn(2 * batch, 77, 1024, generator=g), torch.randn(2 * batch, 1536, generator=g)

    def step():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            unet(x, t, context=ctx, y=y)

    return best(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per batch (the default n_samples)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uncached-steps", type=int, default=2, help="steps timed without the prefix cache (0: none)")
    parser.add_argument("--no-decoder", action="store_true", help="time the prior only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "batch": args.batch}
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        prior = materialize(build_model_on_meta(load_config(bundled_path("configs/karlo/prior_1B_vit_l.yaml"))), dtype)
        row = time_prior(prior, args.batch, args.repeats, precision == "bf16", args.uncached_steps)
        row["peak_rss_after_prior_gb"] = process_memory("VmHWM") / GB
        row["prior_weights_gb"] = sum(p.numel() * p.element_size() for p in prior.parameters()) / GB
        del prior
        if not args.no_decoder:
            config = load_config(bundled_path("configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml"))
            unet = materialize(build_model_on_meta(config).model.diffusion_model, dtype)
            step = time_unet(unet, args.batch, 1, precision == "bf16")
            row.update(unet_step_s=step, decoder_20_steps_s=20 * step,
                       prior_share_of_decoder=row["prior_25_steps_s"] / (20 * step))
            del unet
        row = {k: round(v, 3) for k, v in row.items()}
        results[precision] = row
        print(precision, json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
