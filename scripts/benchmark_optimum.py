"""``--engine openvino`` against optimum-intel's ``OVStableDiffusionPipeline`` on the same random SD 1.x weights.

optimum-intel pins its own transformers / huggingface-hub / nncf ranges, so it is not an sdgen extra; install it
beside sdgen in a second environment that sees the first one's packages::

    python3 -m venv venv-optimum
    echo "import site; site.addsitedir('$(venv/bin/python -c 'import site; print(site.getsitepackages()[0])')')" \
        > "$(venv-optimum/bin/python -c 'import site; print(site.getsitepackages()[0])')/base.pth"
    venv-optimum/bin/pip install optimum-intel==2.2.0 optimum==2.3.0 "openvino==$(venv/bin/python -c \
        'import openvino; print(openvino.__version__.split("-")[0])')" nncf openvino-tokenizers
    venv-optimum/bin/python scripts/benchmark_optimum.py --workdir /tmp/sdgen-optimum --json result.json

Phases (each its own process, so one copy of the network is converted at a time; ``--phase all`` runs them):

1. ``save``: scripts/benchmark_diffusers.py's seeded random SD 1.x weights as a diffusers folder (UNet, VAE,
   the CLIP text encoder, an offline CLIP tokenizer, the DDIM scheduler of the original configs).
2. ``export``: ``OVStableDiffusionPipeline.from_pretrained(folder, export=True, load_in_8bit=False)`` saved as
   OpenVINO IR (float32 weights, no weight compression): seconds and the process's peak memory.
3. ``convert``: sdgen's engine converts the same weights into its cache (``--workdir``/sdgen-cache).
4. ``measure``: both, in one process, alternated: the UNet step (one CFG forward, batch 2, 512 px; medians of
   ``--repeats``; also sdgen's IR compiled once with dynamic shapes instead of per shape) and end to end per step (one 512 px image, ``--steps`` DDIM steps, guidance 7.5, text encoding
   and VAE decode included; medians of ``--e2e-repeats``). optimum-intel is given the static shapes of this run
   (``reshape``), its fastest mode, and the same f32 precision hint, latency hint and thread count as sdgen.
5. ``networks``: the two converted UNets alone (no pipeline code), compiled alike, alternated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_engines import cpu_name, peak_gb  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def ov_config() -> dict[str, Any]:
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}


def save(workdir: Path) -> dict[str, Any]:
    from benchmark_diffusers import diffusers_models, random_sd1
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.modules.encoders.tokenizer import hf_clip_tokenizer

    model = random_sd1()
    unet, vae = diffusers_models(model)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=model.cond_stage_model.transformer,
                                   tokenizer=hf_clip_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(workdir / "diffusers", safe_serialization=True)
    return {"peak_gb": peak_gb()}


def export(workdir: Path) -> dict[str, Any]:
    from optimum.intel import OVStableDiffusionPipeline

    start = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(workdir / "diffusers", export=True, load_in_8bit=False,
                                                     compile=False, ov_config=ov_config())
    pipe.save_pretrained(workdir / "optimum-ir")
    return {"export_and_save_s": time.perf_counter() - start, "peak_gb": peak_gb()}


def sdgen_model(workdir: Path) -> Any:
    from benchmark_diffusers import random_sd1

    from ldm.engines.ov_engine import apply_openvino
    from ldm.generation.inference import prepare_for_inference

    os.environ["SDGEN_OPENVINO_CACHE"] = str(workdir / "sdgen-cache")
    model = prepare_for_inference(random_sd1(), "full", torch.device("cpu"), engine="openvino")
    return apply_openvino(model, "full", ["benchmark random sd1 seed 0 fp32"])


def convert(workdir: Path) -> dict[str, Any]:
    from benchmark_diffusers import unet_inputs

    model = sdgen_model(workdir)
    x, t, ctx = unet_inputs(2, 512, torch.float32, False)
    start = time.perf_counter()
    with torch.no_grad():
        model.model.diffusion_model(x, t, context=ctx)
        model.decode_first_stage(torch.randn(1, 4, 64, 64))
        model.get_learned_conditioning([PROMPT])
    return {"convert_save_compile_first_calls_s": time.perf_counter() - start, "peak_gb": peak_gb()}


def measure(workdir: Path, repeats: int, e2e_repeats: int, steps: int) -> dict[str, Any]:
    from benchmark_diffusers import alternate, sdgen_txt2img, unet_inputs
    from diffusers import DDIMScheduler
    from optimum.intel import OVStableDiffusionPipeline

    ours = sdgen_model(workdir)
    theirs = OVStableDiffusionPipeline.from_pretrained(workdir / "optimum-ir", compile=False, ov_config=ov_config())
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.reshape(batch_size=1, height=512, width=512, num_images_per_prompt=1)
    theirs.compile()
    theirs.set_progress_bar_config(disable=True)
    x, t, ctx = unet_inputs(2, 512, torch.float32, False)

    def sdgen_step():
        with torch.no_grad():
            return ours.model.diffusion_model(x, t, context=ctx)

    def optimum_step():
        return theirs.unet(sample=x, timestep=t[:1], encoder_hidden_states=ctx)  # its static shape: one timestep

    import openvino as ov

    # the engine compiles per shape; the same IR compiled once for dynamic shapes is the alternative (issue: measured)
    dynamic = ov.Core().compile_model(ours.model.diffusion_model.network._model, "CPU", ov_config())

    def sdgen_dynamic_step():
        return dynamic([x, t.float(), ctx])

    with torch.no_grad():
        ours.decode_first_stage(torch.randn(1, 4, 64, 64))  # compiled before timing, as optimum's compile() does
    step = alternate({"sdgen openvino": sdgen_step, "optimum-intel": optimum_step,
                      "sdgen openvino, dynamic shapes": sdgen_dynamic_step}, repeats)
    del dynamic

    def sdgen_e2e():
        with torch.no_grad():
            sdgen_txt2img(ours, "fp32", steps)

    def optimum_e2e():
        theirs(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512, output_type="np",
               generator=torch.Generator().manual_seed(42))

    e2e = alternate({"sdgen openvino": sdgen_e2e, "optimum-intel": optimum_e2e}, e2e_repeats) if e2e_repeats else {}
    return {"unet_step_s": step, "end_to_end_per_step_s": {k: v / steps for k, v in e2e.items()},
            "steps": steps, "repeats": repeats, "e2e_repeats": e2e_repeats, "peak_gb": peak_gb()}


def networks_alone(workdir: Path, repeats: int) -> dict[str, Any]:
    """The two converted UNets without their pipelines: each IR compiled the same way (static CFG shapes, the
    same hints), run on the same arrays, alternated ``repeats`` times after a warm-up; medians."""
    import numpy as np
    import openvino as ov
    from benchmark_diffusers import alternate, unet_inputs

    x, _, ctx = (a.numpy() for a in unet_inputs(2, 512, torch.float32, False))
    ours_xml = max((workdir / "sdgen-cache").glob("*/model.xml"), key=lambda p: p.with_suffix(".bin").stat().st_size)
    runs, nodes = {}, {}
    for name, xml, t in [("sdgen openvino", ours_xml, np.full(2, 500.0, np.float32)),
                         ("optimum-intel", workdir / "optimum-ir" / "unet" / "openvino_model.xml",
                          np.full(1, 500.0, np.float32))]:
        model = ov.Core().read_model(str(xml))
        inputs = [x, t, ctx]
        model.reshape({p.get_any_name(): ov.PartialShape(list(a.shape)) for p, a in zip(model.inputs, inputs)})
        compiled = ov.Core().compile_model(model, "CPU", ov_config())
        nodes[name] = len(compiled.get_runtime_model().get_ops())
        runs[name] = lambda compiled=compiled, inputs=inputs: compiled(inputs)
    return {"unet_step_s": alternate(runs, repeats), "runtime_nodes": nodes, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["all", "save", "export", "convert", "measure", "networks"], default="all")
    parser.add_argument("--workdir", default="/tmp/sdgen-optimum")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.phase == "all":
        import openvino

        report: dict[str, Any] = {"cpu": cpu_name(), "torch": torch.__version__,
                                  "openvino": openvino.__version__.split("-")[0]}
        for phase in ("save", "export", "convert", "measure", "networks"):
            out = workdir / f"{phase}.json"
            if not out.exists():
                subprocess.run([sys.executable, __file__, "--phase", phase, "--workdir", str(workdir), "--repeats",
                                str(args.repeats), "--e2e-repeats", str(args.e2e_repeats), "--steps",
                                str(args.steps), "--json", str(out)], check=True)
            report[phase] = json.loads(out.read_text())
            print(phase, json.dumps(report[phase]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return
    result = {"save": lambda: save(workdir), "export": lambda: export(workdir), "convert": lambda: convert(workdir),
              "measure": lambda: measure(workdir, args.repeats, args.e2e_repeats, args.steps),
              "networks": lambda: networks_alone(workdir, args.repeats)}[args.phase]()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
