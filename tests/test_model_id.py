"""``ldm.model_id``: the released files' layouts identified (kind, config, family, prediction, role, command),
the SD 2 epsilon / v rule, the refusal of a checkpoint given to the wrong command, ``sdgen inspect`` and the
replay of a demo-model PNG without flags."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.config_choice import choose_config
from ldm.errors import SdgenError
from ldm.model_files import file_sha256
from ldm.model_id import (
    V_STATISTIC_KEY,
    check_command,
    identify,
    identify_file,
    read_header,
)
from ldm.output import png_pixels
from tests.golden import released_manifest

REPO = Path(__file__).resolve().parent.parent
SD = "configs/stable-diffusion/"
EXPECTED = {  # manifest: (kind, config, family, prediction, role, command)
    "sd-v1-4": ("sd1", SD + "v1-inference.yaml", "sd", "eps", "model", "txt2img"),
    "v2-1_768-ema-pruned": ("sd2-v", SD + "v2-inference-v.yaml", "sd", "v", "model", "txt2img"),
    "sd21-unclip-l": ("unclip-l", SD + "v2-1-stable-unclip-l-inference.yaml", "unclip", "v", "model", "txt2img"),
    "sd21-unclip-h": ("unclip-h", SD + "v2-1-stable-unclip-h-inference.yaml", "unclip", "v", "model", "txt2img"),
    "sd_xl_base_0.9": ("sdxl-base", "configs/sdxl/sd_xl_base.yaml", "sdxl", "eps", "base", "txt2img"),
    "sd_xl_refiner_0.9": ("sdxl-refiner", "configs/sdxl/sd_xl_refiner.yaml", "sdxl", "eps", "refiner",
                          "sdxl-refine"),
    "512-inpainting-ema": ("sd2-inpaint", SD + "v2-inpainting-inference.yaml", "inpaint", "eps", "model", "inpaint"),
    "512-depth-ema": ("sd2-depth", SD + "v2-midas-inference.yaml", "depth", "eps", "model", "depth2img"),
    "x4-upscaler-ema": ("x4-upscaler", SD + "x4-upscaling.yaml", "upscale", "v", "model", "upscale"),
    "karlo-prior": ("karlo-prior", "configs/karlo/prior_1B_vit_l.yaml", "prior", "x0", "prior", "txt2img --prior"),
}
DTYPE_CODES = {"float16": "F16", "float32": "F32"}


def keys(name: str) -> dict[str, list[int]]:
    return released_manifest(name)["keys"]


def header_file(path: Path, shapes: dict[str, list[int]], dtype: str = "float16",
                metadata: dict | None = None) -> Path:
    """A safetensors file made of its header only (every tensor at offsets [0, 0]): what identification and
    ``sdgen inspect`` read of a .safetensors file, for a full-size layout without gigabytes of data."""
    header: dict = {k: {"dtype": DTYPE_CODES[dtype], "shape": list(v), "data_offsets": [0, 0]}
                    for k, v in shapes.items()}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("manifest", sorted(EXPECTED))
def test_each_released_layout_is_identified(manifest):
    found = identify(keys(manifest))
    assert (found.kind, found.config, found.family, found.prediction, found.role, found.command) == EXPECTED[manifest]
    assert found.reasons and all(isinstance(r, str) and r for r in found.reasons)
    assert (REPO / found.config).is_file()


def test_the_reasons_name_the_deciding_keys_and_shapes():
    assert "input_blocks.0.0.weight [320, 9, 3, 3]" in identify(keys("512-inpainting-ema")).reasons[0]
    assert any("depth_model.*" in r for r in identify(keys("512-depth-ema")).reasons)
    assert any("label_emb.0.0.weight [1280, 1536]" in r for r in identify(keys("sd21-unclip-l")).reasons)
    # the SD 1 layout with a 9-channel UNet is SD 1.5-style inpainting
    sd1_inpaint = dict(keys("sd-v1-4"), **{"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3]})
    assert identify(sd1_inpaint).config == SD + "v1-inpainting-inference.yaml"


def test_sd2_epsilon_or_v_from_the_metadata_or_the_statistic():
    sd2 = keys("v2-1_768-ema-pruned")
    eps = identify(sd2, {"modelspec.prediction_type": "epsilon"})
    assert (eps.kind, eps.config, eps.prediction) == ("sd2", SD + "v2-inference.yaml", "eps")
    assert "metadata says modelspec.prediction_type=epsilon" in eps.reasons[-1]
    assert identify(sd2, {"modelspec.prediction_type": "v"}).kind == "sd2-v"
    assert identify(sd2, {"modelspec.prediction_type": "v"}, v_std=0.01).kind == "sd2-v"  # metadata first
    high, low = identify(sd2, v_std=0.2), identify(sd2, v_std=0.05)
    assert (high.kind, low.kind) == ("sd2-v", "sd2")
    assert "0.200 > 0.09 (ComfyUI's rule)" in high.reasons[-1] and "0.050 <= 0.09" in low.reasons[-1]
    assert "no way to tell epsilon from v" in identify(sd2).reasons[-1]


def test_identify_file_measures_the_statistic_once_and_notices_a_changed_file(tmp_path):
    shapes = {k: (1,) for k in keys("v2-1_768-ema-pruned")}
    path = tmp_path / "sd2.safetensors"

    def write(std: float) -> None:
        tensors = {k: torch.zeros(s) for k, s in shapes.items()}
        tensors[V_STATISTIC_KEY] = torch.randn(320, generator=torch.Generator().manual_seed(0)) * std
        save_file(tensors, str(path))

    write(0.2)
    first = identify_file(path)
    assert first.kind == "sd2-v" and first.source == "sd2.safetensors" and "ComfyUI" in first.reasons[-1]
    assert identify_file(path) is first  # cached: the header is read once per run
    write(0.02)
    assert identify_file(path).kind == "sd2"


def test_unknown_keys_and_wrong_commands_are_refused_with_what_is_needed(tmp_path):
    unknown = identify({"foo.weight": (3, 3)})
    assert unknown.kind is None and unknown.config is None
    with pytest.raises(SdgenError, match="sdgen txt2img: cannot tell which model x.safetensors is from its keys"):
        check_command(unknown, "txt2img", "x.safetensors")
    with pytest.raises(SdgenError, match="cannot tell which model"):
        choose_config(header_file(tmp_path / "odd.safetensors", {"foo.weight": [3, 3]}))
    inpainting = identify(keys("512-inpainting-ema"))
    with pytest.raises(SdgenError) as refused:
        check_command(inpainting, "txt2img", "checkpoints/512-inpainting-ema.ckpt")
    assert str(refused.value) == ("sdgen txt2img: 512-inpainting-ema.ckpt is an SD 2 inpainting checkpoint; "
                                  "run it with sdgen inpaint")
    for command, name, needs in (("depth2img", "sd-v1-4", "sdgen txt2img"), ("upscale", "512-depth-ema", "depth2img"),
                                 ("txt2img", "karlo-prior", "sdgen txt2img --prior"),
                                 ("txt2img", "sd_xl_refiner_0.9", "sdgen sdxl-refine"),
                                 ("unclip-variate", "v2-1_768-ema-pruned", "sdgen txt2img")):
        with pytest.raises(SdgenError, match=needs):
            check_command(identify(keys(name)), command)
    for command, name in (("inpaint", "512-inpainting-ema"), ("inpaint", "sd-v1-4"), ("inpaint", "v2-1_768-ema-pruned"),
                          ("depth2img", "512-depth-ema"), ("upscale", "x4-upscaler-ema"), ("txt2img", "sd21-unclip-l"),
                          ("sdxl-refine", "sd_xl_refiner_0.9"), ("img2img", "sd_xl_base_0.9")):
        check_command(identify(keys(name)), command)  # accepted


def test_txt2img_refuses_an_inpainting_checkpoint_before_loading_it(tmp_path):
    ckpt = header_file(tmp_path / "512-inpainting-ema.safetensors", keys("512-inpainting-ema"))
    result = invoke("txt2img", "a cat", "--ckpt", ckpt, "--outdir", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("sdgen: error: sdgen txt2img: 512-inpainting-ema.safetensors is an SD 2 "
                                     "inpainting checkpoint; run it with sdgen inpaint")


def test_model_id_imports_no_model_code():
    code = "import sys, ldm.model_id; print(sorted(m for m in sys.modules if m.startswith('ldm.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert eval(out.stdout) == ["ldm.errors", "ldm.model_id"]


# ----------------------------------------------------------------------------- sdgen inspect


def test_inspect_a_checkpoint_lines_and_json(tmp_path):
    shapes = keys("v2-1_768-ema-pruned")
    path = header_file(tmp_path / "v2-1_768-ema-pruned.safetensors", shapes, metadata={
        "modelspec.prediction_type": "v"})
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    count = sum(int(np.prod(s)) for s in shapes.values())
    for line in ("kind: sd2-v", "family: sd", f"config: {SD}v2-inference-v.yaml", "prediction: v",
                 "command: txt2img", "dtype: float16", f"parameters: {count:,}",
                 f"model hash: {file_sha256(path)[:10]}"):
        assert line in lines
    assert lines[-1].startswith("reasons: ") and "modelspec.prediction_type=v" in lines[-1]
    facts = json.loads(invoke("inspect", path, "--json").stdout)
    assert facts["kind"] == "sd2-v" and facts["parameters"] == count and facts["dtype"] == ["float16"]
    assert facts["sha256"] == file_sha256(path) and facts["model_hash"] == facts["sha256"][:10]


def test_inspect_adapters_from_real_tensors(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(lora))
    facts = json.loads(invoke("inspect", lora, "--json").stdout)
    assert (facts["kind"], facts["use"], facts["parameters"], facts["dtype"]) == ("lora", "pass it with --lora",
                                                                                  257, ["float32"])
    embedding = tmp_path / "shiny.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768, dtype=torch.float16)}, "name": "shiny"}, embedding)
    facts = json.loads(invoke("inspect", embedding, "--json").stdout)
    assert (facts["kind"], facts["parameters"], facts["dtype"]) == ("embedding", 1536, ["float16"])
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
               "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(vae))
    assert "kind: vae" in invoke("inspect", vae).stdout.splitlines()
    assert read_header(vae).parameters == 8 * 27 * 2 + 64


def test_inspect_refuses_bad_files_in_one_line(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("just text\n")
    whole = header_file(tmp_path / "whole.safetensors", {"a.weight": [4]}, dtype="float32")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(whole.read_bytes()[:-10])
    odd = tmp_path / "odd.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(odd))
    for path, message in ((tmp_path / "missing.ckpt", "not found"), (tmp_path / "empty.safetensors", "empty"),
                          (tmp_path / "notes.ckpt", "it looks like a text file"), (truncated, "truncated"),
                          (odd, "not a checkpoint, LoRA, embedding or VAE file sdgen recognises")):
        result = invoke("inspect", path)
        assert result.exit_code == 2 and message in result.stderr, (path, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- replay of a demo-model image


def test_a_demo_model_png_replays_without_flags(tmp_path, monkeypatch, hash_cache_dir):
    monkeypatch.chdir(tmp_path)  # no checkpoint at the default path: the bundled demo model is used
    made = invoke("txt2img", "a red circle", "--H", "32", "--W", "32", "--steps", "2", "--n_samples", "1",
                  "--n_iter", "1", "--device", "cpu", "--outdir", "first", "--seed", "3")
    assert made.exit_code == 0, made.stderr
    png = next((tmp_path / "first" / "samples").glob("*.png"))
    again = invoke("replay", png, "--outdir", "again")
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(png_pixels(png), png_pixels(next((tmp_path / "again" / "samples").glob("*.png"))))
