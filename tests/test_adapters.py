"""LoRA (kohya and peft layouts), textual-inversion embeddings and --vae on the tiny models: the merge is the
low-rank forward, the layouts agree bit for bit, the files are checked before loading, recorded and replayed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ldm.adapters import embeddings as ti
from ldm.adapters.lora import LoraLayer, lora_forward, match_lora, merge_lora, read_lora
from ldm.adapters.lora_keys import lora_targets
from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config
from ldm.cli.app import app
from ldm.modules.encoders.prompts import TextOptions, chunk_prompt
from ldm.output import load_manifest, png_pixels
from tests.conftest import REPO, randomized_state_dict

TINY = REPO / "configs" / "tests"
RANK, ALPHA = 4, 2.0


def tiny(name: str, seed: int = 4):
    model = build_model_on_meta(load_config(TINY / f"{name}.yaml"))
    return assign_state_dict(model, randomized_state_dict(model, seed=seed), source=name)


def names_by_key(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, target in lora_targets(model).items():
        out.setdefault(target.key + (str(target.rows) if target.rows else ""), []).append(name)
    return out


def lora_layers(model, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (up, down) pairs for a UNet attention projection, a UNet 3x3 convolution (LoCon) and a text encoder
    projection of ``model``, keyed by the target (state_dict key[rows])."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    by_key = names_by_key(model)
    wanted = [next(k for k in by_key if k.endswith("attn1.to_q.weight")),
              next(k for k in by_key if k.endswith("in_layers.2.weight") and len(shapes[k]) == 4),
              next(k for k in by_key if ("q_proj" in k or "in_proj" in k) and k.startswith(("cond_stage", "conditioner")))]
    out = {}
    for key in wanted:
        full = shapes[key.split("(")[0]]
        rows = full[0] // 3 if "(" in key else full[0]
        down = torch.randn((RANK, *full[1:]), generator=g) * 0.5
        up = torch.randn((rows, RANK, *([1, 1] if len(full) == 4 else [])), generator=g) * 0.5
        out[key] = (up, down)
    return out


def write_lora(model, layers, path: Path, layout: str) -> Path:
    """Write ``layers`` in the kohya (``lora_unet_*.lora_down/up``, ``.alpha``) or peft (``unet.*.lora_A/B``,
    ``lora_alpha`` metadata) layout."""
    by_key = names_by_key(model)
    tensors, metadata = {}, None
    for key, (up, down) in layers.items():
        names = by_key[key]
        if layout == "kohya":
            name = next(n for n in names if n.startswith("lora_") and ("input_blocks" not in n and "output_blocks" not in n
                                                                     and "middle_block" not in n))
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(ALPHA)})
        else:
            name = next(n for n in names if not n.startswith("lora_"))
            tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
            metadata = {"lora_alpha": str(ALPHA)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------- the merge


def test_merged_weights_equal_the_unmerged_low_rank_forward():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(16, 12, bias=False)
    layer = LoraLayer(down=torch.randn(RANK, 16, generator=g), up=torch.randn(12, RANK, generator=g), alpha=ALPHA)
    x = torch.randn(5, 16, generator=g)
    expected = linear(x) + lora_forward(x, layer, 0.8)
    merged = linear.weight.detach() + 0.8 * layer.delta()
    torch.testing.assert_close(x @ merged.T, expected, rtol=1e-5, atol=1e-5)
    # LoCon: a 3x3 down convolution then a 1x1 up convolution is one 3x3 convolution with up @ down
    conv = LoraLayer(down=torch.randn(RANK, 6, 3, 3, generator=g), up=torch.randn(8, RANK, 1, 1, generator=g))
    image = torch.randn(1, 6, 9, 9, generator=g)
    low_rank = F.conv2d(F.conv2d(image, conv.down, padding=1), conv.up)
    torch.testing.assert_close(F.conv2d(image, conv.delta(), padding=1), low_rank, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd1-tiny", "sd2v-tiny", "sdxl-base-tiny"])
def test_both_layouts_merge_the_same_delta_into_the_named_weights(family, tmp_path):
    model = tiny(family)
    layers = lora_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = {}
    for layout in ("kohya", "peft"):
        path = write_lora(model, layers, tmp_path / f"{layout}.safetensors", layout)
        found, keys = read_lora(path)
        matched = match_lora(path, found, keys, lora_targets(model), {k: tuple(v.shape) for k, v in before.items()})
        assert len(matched) == 3
        copy = tiny(family)
        merge_lora(copy, matched, 0.7)
        merged[layout] = copy.state_dict()
    for key, value in merged["kohya"].items():
        assert torch.equal(value, merged["peft"][key]), key
    for target, (up, down) in layers.items():
        key = target.split("(")[0]
        delta = 0.7 * (ALPHA / RANK) * (up.flatten(1) @ down.flatten(1))
        got = merged["kohya"][key] - before[key]
        if "(" in target:  # OpenCLIP's fused in_proj: a q_proj LoRA changes the first third of the rows only
            third = got.shape[0] // 3
            torch.testing.assert_close(got[:third], delta, rtol=1e-4, atol=1e-5)
            assert not got[third:].any()
        else:
            torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-4, atol=1e-5)
    changed = [k for k in before if not torch.equal(before[k], merged["kohya"][k])]
    assert len(changed) == 3


# ----------------------------------------------------------------------------- the command line


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def samples(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_checkpoint, tiny_config):
    root = tmp_path_factory.mktemp("adapters")
    model = build_model_on_meta(load_config(tiny_config))
    assign_state_dict(model, dict(load_file(str(tiny_checkpoint))))
    layers = lora_layers(model)
    (root / "loras").mkdir()
    files = {"root": root, "ckpt": tiny_checkpoint, "config": tiny_config,
             "kohya": write_lora(model, layers, root / "loras" / "styleA.safetensors", "kohya"),
             "peft": write_lora(model, layers, root / "peft.safetensors", "peft")}
    vae = {k[len("first_stage_model."):]: v for k, v in model.state_dict().items() if k.startswith("first_stage_model.")}
    save_file({k: v.contiguous() for k, v in vae.items()}, str(root / "same-vae.safetensors"))
    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae.items()}, str(root / "prefixed-vae.safetensors"))
    other = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) if v.is_floating_point()
             else v for k, v in vae.items()}
    torch.save({"state_dict": {**other, "loss.logvar": torch.zeros(())}}, root / "other-vae.ckpt")
    width = model.cond_stage_model._token_embedding().embedding_dim
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(3)) * 0.5
    (root / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": vectors}, "name": "x", "step": 100}, root / "embeddings" / "shinycube.pt")
    save_file({"emb_params": vectors}, str(root / "shinycube-st.safetensors"))
    torch.save({"<shinycube>": vectors[0]}, root / "learned_embeds.bin")
    save_file({"clip_l": vectors, "clip_g": torch.zeros(2, 1280)}, str(root / "xl-style.safetensors"))
    save_file({"emb_params": torch.zeros(1, width + 8)}, str(root / "wide.safetensors"))
    return files


def run(sd1, out: Path, *extra: object, prompt: str = "a red cube"):
    result = invoke("txt2img", prompt, "--ckpt", sd1["ckpt"], "--config", sd1["config"], "--H", "16", "--W", "16",
                    "--steps", "4", "--n_samples", "2", "--n_iter", "1", "--device", "cpu", "--outdir", out,
                    "--lora-dir", sd1["root"] / "loras", "--embeddings-dir", sd1["root"] / "embeddings", *extra)
    return result


def test_lora_layouts_weights_and_tags_through_the_command(sd1, tmp_path):
    plain = run(sd1, tmp_path / "plain")
    assert plain.exit_code == 0, plain.stderr
    outputs = {}
    for name, extra, prompt in [("kohya", ["--lora", f"{sd1['kohya']}:0.8"], "a red cube"),
                                ("peft", ["--lora", f"{sd1['peft']}:0.8"], "a red cube"),
                                ("tag", [], "a red cube<lora:styleA:0.8>"),
                                ("zero", ["--lora", f"{sd1['kohya']}:0"], "a red cube")]:
        result = run(sd1, tmp_path / name, *extra, prompt=prompt)
        assert result.exit_code == 0, (name, result.stderr)
        outputs[name] = samples(tmp_path / name)
    base = samples(tmp_path / "plain")
    for a, b, c in zip(outputs["kohya"], outputs["peft"], outputs["tag"]):
        np.testing.assert_array_equal(a, b)  # the same dW in either layout: the same pixels
        np.testing.assert_array_equal(a, c)  # the tag is the flag, and leaves the text
    for a, b in zip(outputs["zero"], base):
        np.testing.assert_array_equal(a, b)  # weight 0: no LoRA
    assert any((a != b).any() for a, b in zip(outputs["kohya"], base))
    from PIL import Image

    text = Image.open(sorted((tmp_path / "kohya" / "samples").glob("*.png"))[0]).text["parameters"]
    assert "Lora hashes: \"styleA: " in text


def test_a_lora_for_another_family_is_refused_with_the_count_and_first_key(sd1, tmp_path):
    bad = tmp_path / "xl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)}, str(bad))
    result = run(sd1, tmp_path / "out", "--lora", bad)
    assert result.exit_code == 2
    assert "3 of 3 keys match no layer (first: lora_te2_" in result.stderr and "SDXL" in result.stderr
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())
    missing = run(sd1, tmp_path / "out", prompt="a cube <lora:nosuch:1>")
    assert missing.exit_code == 2 and "no LoRA file nosuch" in missing.stderr


def test_embedding_formats_read_the_same_vectors(sd1):
    root = sd1["root"]
    a1111 = ti.read_embedding(root / "embeddings" / "shinycube.pt")
    st = ti.read_embedding(root / "shinycube-st.safetensors")
    diffusers = ti.read_embedding(root / "learned_embeds.bin")
    xl = ti.read_embedding(root / "xl-style.safetensors")
    assert a1111.name == "shinycube" and a1111.vectors["*"].shape[0] == 2
    assert torch.equal(a1111.vectors["*"], st.vectors["*"])
    assert torch.equal(diffusers.vectors["*"], a1111.vectors["*"][:1])
    assert set(xl.vectors) == {"clip_l", "clip_g"} and torch.equal(xl.vectors["clip_l"], a1111.vectors["*"])


def test_a_multi_vector_embedding_takes_a_position_per_vector():
    model = tiny("sd1-tiny")
    encoder = model.cond_stage_model
    ti.register([encoder], ti.Embedding("trio", {"*": torch.randn(3, encoder._token_embedding().embedding_dim)}))
    options = TextOptions(embeddings=("trio",))
    tokens = chunk_prompt(encoder, "a trio cube", options)[0].tokens
    ids = encoder.embedding_ids("trio")
    assert tokens[1:6] == encoder.word_ids("a") + ids + encoder.word_ids("cube") and len(ids) == 3


def test_the_trigger_word_changes_the_image_and_its_absence_does_not(sd1, tmp_path):
    for name, prompt, extra in [("plain", "a red cube", ["--embeddings-dir", tmp_path / "none"]),
                                ("absent", "a red cube", []), ("trigger", "a shinycube", []),
                                ("word", "a shinycube", ["--embeddings-dir", tmp_path / "none"])]:
        result = run(sd1, tmp_path / name, *extra, prompt=prompt)
        assert result.exit_code == 0, (name, result.stderr)
    for a, b in zip(samples(tmp_path / "plain"), samples(tmp_path / "absent")):
        np.testing.assert_array_equal(a, b)
    assert all((a != b).any() for a, b in zip(samples(tmp_path / "trigger"), samples(tmp_path / "word")))
    from PIL import Image

    text = Image.open(sorted((tmp_path / "trigger" / "samples").glob("*.png"))[0]).text["parameters"]
    assert 'TI hashes: "shinycube: ' in text
    wide = run(sd1, tmp_path / "wide", "--embedding", sd1["root"] / "wide.safetensors")
    assert wide.exit_code == 2 and "another model family" in wide.stderr


def test_vae_files_with_and_without_the_prefix(sd1, tmp_path):
    base = run(sd1, tmp_path / "base")
    assert base.exit_code == 0
    for name in ("same-vae.safetensors", "prefixed-vae.safetensors"):
        result = run(sd1, tmp_path / name, "--vae", sd1["root"] / name)
        assert result.exit_code == 0, result.stderr
        for a, b in zip(samples(tmp_path / "base"), samples(tmp_path / name)):
            np.testing.assert_array_equal(a, b)  # the checkpoint's own VAE weights: the same pixels
    other = run(sd1, tmp_path / "other", "--vae", sd1["root"] / "other-vae.ckpt")
    assert other.exit_code == 0, other.stderr
    assert all((a != b).any() for a, b in zip(samples(tmp_path / "base"), samples(tmp_path / "other")))
    wrong = run(sd1, tmp_path / "wrong", "--vae", sd1["kohya"])
    assert wrong.exit_code == 2 and "does not fit this model" in wrong.stderr


def test_adapters_are_recorded_and_replayed_and_a_changed_file_is_refused(sd1, tmp_path):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(Path(sd1["kohya"]).read_bytes())
    first = tmp_path / "first"
    result = run(sd1, first, "--lora", f"{lora}:0.6", "--vae", sd1["root"] / "other-vae.ckpt", "--clip-skip", "2",
                 prompt="a (shinycube:1.2) [red] cube")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(first / "run-0000.json")
    adapters = manifest["adapters"]
    assert adapters["loras"][0]["weight"] == 0.6 and len(adapters["loras"][0]["sha256"]) == 64
    assert [e["name"] for e in adapters["embeddings"]] == ["shinycube"] and adapters["vae"]["sha256"]
    assert manifest["settings"]["clip_skip"] == 2 and manifest["settings"]["prompt_syntax"] == "a1111"
    from PIL import Image

    text = Image.open(sorted((first / "samples").glob("*.png"))[0]).text["parameters"]
    for field in ("Clip skip: 2", "Lora hashes: \"mine: ", "TI hashes: \"shinycube: ", "VAE hash: ",
                  "Prompt syntax: a1111"):
        assert field in text, field
    again = invoke("replay", first / "run-0000.json", "--outdir", tmp_path / "again")
    assert again.exit_code == 0, again.stderr
    for a, b in zip(samples(first), samples(tmp_path / "again")):
        np.testing.assert_array_equal(a, b)
    save_file({k: v * 2 for k, v in load_file(str(lora)).items()},
              str(lora))
    refused = invoke("replay", first / "run-0000.json", "--outdir", tmp_path / "x")
    assert refused.exit_code == 2 and "LoRA file mine differs" in refused.stderr, refused.stderr


def test_prompt_lines_with_different_lora_sets_are_refused(sd1, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cube <lora:styleA:0.5>\na sphere\n")
    result = invoke("txt2img", "--from-file", prompts, "--ckpt", sd1["ckpt"], "--config", sd1["config"], "--H", "16",
                    "--W", "16", "--steps", "2", "--device", "cpu", "--outdir", tmp_path / "o", "--lora-dir",
                    sd1["root"] / "loras")
    assert result.exit_code == 2 and "different LoRA sets" in result.stderr, result.stderr
    original = run(sd1, tmp_path / "orig", "--prompt-syntax", "original", prompt="a cube <lora:styleA:0.5>")
    assert original.exit_code == 0, original.stderr  # the original syntax reads tags as words, applies no LoRA


def test_sdxl_embedding_parts_go_to_their_encoders():
    model = tiny("sdxl-base-tiny")
    width = 32
    l_part, g_part = torch.randn(2, width), torch.randn(2, width)
    ti.register(model.text_encoders(), ti.Embedding("xl", {"clip_l": l_part, "clip_g": g_part}))
    first, second = model.text_encoders()
    assert torch.equal(first._token_embedding().weight[first.embedding_ids("xl")], l_part)
    assert torch.equal(second._token_embedding().weight[second.embedding_ids("xl")], g_part)


def test_every_unet_layer_has_its_diffusers_name_in_both_layouts():
    model = tiny("sd1-tiny")
    targets = lora_targets(model)
    unet_keys = {f"model.diffusion_model.{n}.weight" for n, m in model.model.diffusion_model.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    peft = {t.key for n, t in targets.items() if n.startswith("unet.")}
    assert peft == unet_keys  # down, mid and up blocks, time embedding, conv_in / conv_out
    assert targets["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].key == (
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight")
    assert targets["lora_unet_mid_block_resnets_1_conv2"].key == "model.diffusion_model.middle_block.2.out_layers.3.weight"
