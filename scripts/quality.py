#!/usr/bin/env python3
"""Measure the demo model: color and shape accuracy of generated images, and the img2img recoloring check.

    python scripts/quality.py                        # the bundled demo model
    python scripts/quality.py --ckpt logs/shapes-ldm/weights/last.safetensors --steps 20
    python scripts/quality.py --heldout              # also the prompts that are not held to the targets

Prints a table (per prompt: color / shape matches out of the seeds) and the totals against the targets
(color >= 90 %, shape >= 75 %), then the img2img check: "a blue circle" from a red circle at strength 0.8.
Sampler, steps and guidance scale default to the config's ``sampling_defaults`` (what txt2img uses).
Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ldm.bundled import bundled_path  # noqa: E402
from ldm.checkpoint import load_config, load_model  # noqa: E402
from ldm.defaults import defaults_for  # noqa: E402
from ldm.demo import quality  # noqa: E402
from ldm.errors import SdgenError  # noqa: E402
from ldm.model_files import DEMO_CKPT, DEMO_CONFIG  # noqa: E402
from ldm.sampling.samplers import SAMPLERS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(bundled_path(DEMO_CONFIG)))
    parser.add_argument("--ckpt", default=str(bundled_path(DEMO_CKPT)))
    parser.add_argument("--sampler", help="default: the config's sampling_defaults")
    parser.add_argument("--steps", type=int, help="default: the config's sampling_defaults")
    parser.add_argument("--scale", type=float, help="default: the config's sampling_defaults")
    parser.add_argument("--seeds", type=int, default=len(quality.QUALITY_SEEDS), help="seeds 0..N-1 per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-img2img", action="store_true", help="skip the img2img check")
    parser.add_argument("--heldout", action="store_true",
                        help="also score quality.HELDOUT_PROMPTS (reported, not held to the targets)")
    args = parser.parse_args(argv)
    if any(v is not None and v <= 0 for v in (args.steps, args.seeds)):
        parser.error("--steps and --seeds must be positive")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        parser.error(f"unknown sampler {args.sampler!r} ({', '.join(SAMPLERS)})")
    try:
        return run(args)
    except SdgenError as err:  # a missing or mismatched config / checkpoint: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    # unset --sampler / --steps / --scale: what txt2img uses for this config (ldm.defaults)
    defaults = defaults_for("txt2img", "sd", config)
    given = {"sampler": args.sampler, "steps": args.steps, "scale": args.scale}
    sampling = {k: v if v is not None else defaults[k] for k, v in given.items()}
    model = load_model(config, args.ckpt).eval()
    print(f"{sampling['sampler']}, {sampling['steps']} steps, guidance scale {sampling['scale']:g}, "
          f"seeds 0-{args.seeds - 1}")
    seeds = list(range(args.seeds))
    with torch.no_grad():
        generate = quality.pipeline_generator(model, **sampling)
        report = quality.evaluate(generate, seeds=seeds)
        print(quality.format_table(report))
        ok = report.color_accuracy >= quality.COLOR_TARGET and report.shape_accuracy >= quality.SHAPE_TARGET
        if args.heldout:
            print("\nheld-out prompts (not held to the targets):")
            print(quality.format_table(quality.evaluate(generate, prompts=quality.HELDOUT_PROMPTS, seeds=seeds)))
        if not args.no_img2img:
            rate = quality.img2img_recolor_rate(model, seeds=range(max(args.seeds, 10)), **sampling)
            print(f"img2img red circle -> 'a blue circle' (strength 0.8): {rate:.0%} blue "
                  f"(target {quality.RECOLOR_TARGET:.0%})")
            ok = ok and rate >= quality.RECOLOR_TARGET
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
