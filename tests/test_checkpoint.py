"""Checkpoint reading and strict loading (ldm/checkpoint.py) on tiny SD 1.x-shaped files written here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import assign_state_dict, build_model_on_meta, load_config, load_model
from ldm.model_files import (
    CONFIG_SD1,
    CONFIG_SD2V,
    CONFIG_SDXL_BASE,
    CONFIG_SDXL_REFINER,
    CONFIG_UNCLIP_H,
    CONFIG_UNCLIP_L,
    bundled_config,
    model_hash,
)
from ldm.model_id import identify
from ldm.checkpoint_reader import InertObject, read_pickle_checkpoint, read_state_dict
from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
from tests.golden import GOLDEN, released_manifest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tests" / "sd1-tiny.yaml"
WEIGHTS = GOLDEN / "sd1.weights.safetensors"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def sd1() -> dict[str, torch.Tensor]:
    """The complete tiny SD 1.x state_dict (original key names, fp32)."""
    return load_file(str(WEIGHTS))


def _lightning_checkpoint(sd: dict[str, torch.Tensor], dirpath: Path) -> dict:
    """A dict shaped like sd-v1-4.ckpt: Lightning bookkeeping, a pickled ModelCheckpoint, numpy scalars."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=str(dirpath), monitor="val/loss_simple_ema", save_top_k=1)
    callback.best_model_score = np.float64(0.1234)
    state = dict(sd)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    state[POSITION_IDS] = torch.arange(77)[None]
    return {
        "state_dict": state,
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        # Lightning 1.4 keys callback states by the class itself; newer versions by a string
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float32(0.1234), "dirpath": str(dirpath)},
                      "instance": callback},
        "optimizer_states": [],
        "lr_schedulers": [],
        "loss_scale": np.dtype("float32"),
    }


@pytest.fixture(scope="module")
def lightning_ckpt(sd1, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lightning")
    path = folder / "sd-v1-tiny.ckpt"
    torch.save(_lightning_checkpoint(sd1, folder), path)
    return path


def test_lightning_ckpt_loads_without_running_its_code(lightning_ckpt):
    path = lightning_ckpt
    # a fresh interpreter: reading the file must neither import Lightning / fsspec nor build their objects
    probe = (
        "import sys\n"
        "from ldm.checkpoint_reader import read_pickle_checkpoint, read_state_dict, InertObject\n"
        f"obj = read_pickle_checkpoint({str(path)!r})\n"
        "cb = obj['callbacks']\n"
        "cls = [k for k in cb if not isinstance(k, str)][0]\n"
        "assert issubclass(cls, InertObject) and cls.original_name.endswith('ModelCheckpoint'), cls\n"
        "inst = cb['instance']\n"
        "assert isinstance(inst, InertObject) and inst.state['monitor'] == 'val/loss_simple_ema', inst.state\n"
        "assert float(cb[cls]['best_model_score']) == float(__import__('numpy').float32(0.1234))\n"
        f"sd = read_state_dict({str(path)!r})\n"
        "assert len(sd) == 477, len(sd)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'fsspec')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_lightning_ckpt_loads_into_model(lightning_ckpt, sd1, caplog):
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        model = load_model(TINY, lightning_ckpt)
    notes = [r.getMessage() for r in caplog.records if "known extra keys" in r.getMessage()]
    assert len(notes) == 1 and "dropped 3 known extra keys" in notes[0]
    assert "model_ema" in notes[0] and "position_ids" in notes[0]
    loaded = model.state_dict()
    assert set(loaded) == set(sd1)
    for key, value in sd1.items():
        assert torch.equal(loaded[key], value), key


def _make_marker(path: str) -> None:
    Path(path).touch()


class _Exploit:
    """Unpickling this would call _make_marker (i.e. run code from the file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def test_ckpt_with_foreign_class_is_refused_and_nothing_runs(tmp_path, sd1):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(SdgenError, match=r"tests\.test_checkpoint\._make_marker"):
        read_state_dict(path)
    assert not marker.exists()


def test_ckpt_with_os_system_reference_is_refused(tmp_path):
    path = tmp_path / "system.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": os.system}, path)
    with pytest.raises(SdgenError, match=r"posix\.system") as err:
        read_state_dict(path)
    assert "refusing to load" in str(err.value)


def test_custom_class_instance_is_refused_by_name(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "opt": types.SimpleNamespace(lr=1.0)}, path)
    with pytest.raises(SdgenError, match=r"types\.SimpleNamespace"):
        read_state_dict(path)


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy globals under their numpy 1.x module names, as files from 2022 name them."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            qual = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core'):]}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def test_numpy1_scalar_names_are_allowed(tmp_path):
    path = tmp_path / "np1.ckpt"
    module = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="np1pickle")
    torch.save({"state_dict": {"w": torch.ones(2)}, "score": np.float64(2.5)}, path, pickle_module=module)
    with torch.serialization._open_zipfile_reader(str(path)) as reader:
        pkl = reader.get_record(next(n for n in reader.get_all_records() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in pkl
    obj = read_pickle_checkpoint(path)
    assert obj["score"] == 2.5 and torch.equal(obj["state_dict"]["w"], torch.ones(2))


def test_plain_state_dict_pickle_without_wrapper(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a.weight": torch.arange(6.0).reshape(2, 3), "step": 3}, path)
    sd = read_state_dict(path)
    assert list(sd) == ["a.weight"] and torch.equal(sd["a.weight"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.float32])
def test_safetensors_loads_in_both_precisions(tmp_path, sd1, file_dtype):
    path = tmp_path / f"tiny-{file_dtype}.safetensors"
    save_file({k: v.to(file_dtype) if v.is_floating_point() else v for k, v in sd1.items()}, str(path))
    model = load_model(str(TINY), path)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 or not value.is_floating_point(), key
        assert torch.equal(value, sd1[key].to(file_dtype).to(torch.float32)), key
    half = load_model(str(TINY), path, dtype=torch.float16)
    unet_w = half.model.diffusion_model.input_blocks[0][0].weight
    assert unet_w.dtype == torch.float16
    assert half.first_stage_model.decoder.conv_out.weight.dtype == torch.float16
    # schedule buffers keep float32 whatever the weights' dtype; integer buffers keep theirs
    # (with the file's values, as the original load_state_dict would copy them)
    assert half.alphas_cumprod.dtype == torch.float32
    assert torch.equal(half.alphas_cumprod, sd1["alphas_cumprod"].to(file_dtype).float())
    assert half.lvlb_weights.dtype == torch.float32
    pos = half.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])


def test_nothing_left_on_meta_and_model_is_frozen(tmp_path, sd1):
    path = tmp_path / "tiny.safetensors"
    save_file(sd1, str(path))
    model = load_model(TINY, path)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors and all(t.device.type == "cpu" for _, t in tensors)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_missing_schedule_buffers_are_recomputed_with_a_note(tmp_path, sd1, caplog):
    path = tmp_path / "no-schedule.safetensors"
    save_file({k: v for k, v in sd1.items() if "." in k}, str(path))
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        model = load_model(TINY, path)
    assert any("12 schedule buffers" in r.getMessage() for r in caplog.records)
    assert torch.equal(model.sqrt_recipm1_alphas_cumprod, sd1["sqrt_recipm1_alphas_cumprod"])


def test_missing_keys_are_counted_and_named(tmp_path, sd1):
    dropped = sorted(k for k in sd1 if k.startswith("model.diffusion_model.out."))
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd1.items() if k not in dropped}, str(path))
    with pytest.raises(SdgenError) as err:
        load_model(TINY, path)
    msg = str(err.value)
    named = msg.split(f"{len(dropped)} missing keys (")[1].split(")")[0].split(", ")
    assert named[:3] and set(named[:3]) <= set(dropped) and named[3:] == ["..."]
    assert str(path) in msg and "\n" not in msg


def test_wrong_shape_and_unknown_key(tmp_path, sd1):
    bad = dict(sd1)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    bad[key] = torch.zeros(8, 4, 3, 3)
    bad["model.diffusion_model.surprise.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(SdgenError) as err:
        load_model(TINY, path)
    msg = str(err.value)
    assert f"1 shape mismatches ({key} (file [8, 4, 3, 3], model [32, 4, 3, 3]))" in msg
    assert "1 unexpected keys (model.diffusion_model.surprise.weight)" in msg


def test_sdxl_file_given_to_v1_config_names_the_sdxl_config(tmp_path):
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
        "conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
        "model.diffusion_model.label_emb.0.0.weight": torch.ones(8, 4),
        "first_stage_model.quant_conv.weight": torch.ones(8, 8, 1, 1),
    }
    path = tmp_path / "sdxl-like.safetensors"
    save_file(sdxl, str(path))
    with pytest.raises(SdgenError, match=r"needs configs/sdxl/sd_xl_base\.yaml"):
        load_model(bundled_config(CONFIG_SD1), path)


def test_released_sdxl_key_set_against_v1_model():
    """The full SDXL 0.9 key/shape set (as meta tensors) fed to the full v1 model: counted, named, guessed."""
    keys = released_manifest("sd_xl_base_0.9")["keys"]
    sdxl = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    model = build_model_on_meta(bundled_config(CONFIG_SD1))
    with pytest.raises(SdgenError) as err:
        assign_state_dict(model, sdxl, source="sd_xl_base_0.9.safetensors", config_name=CONFIG_SD1)
    msg = str(err.value)
    ours = model.state_dict()
    missing = set(ours) - set(keys) - set(SCHEDULE_BUFFERS)  # those are computed from the config
    unexpected = {k for k in set(keys) - set(ours) if not k.endswith("position_ids")}
    wrong = {k for k in set(ours) & set(keys) if list(ours[k].shape) != keys[k]}
    assert len(missing) == 466 and len(unexpected) == 1851 and len(wrong) == 176
    assert f"{len(missing)} missing keys (model.diffusion_model.input_blocks.1.1.norm.weight, " in msg
    assert f"{len(unexpected)} unexpected keys (model.diffusion_model.label_emb.0.0.weight, " in msg
    assert f"{len(wrong)} shape mismatches (model.diffusion_model.input_blocks.4.1.proj_in.weight " in msg
    assert msg.endswith("the file looks like it needs configs/sdxl/sd_xl_base.yaml")


def test_matching_file_with_wrong_width_does_not_blame_another_config(tmp_path, sd1):
    bad = dict(sd1)
    bad["model.diffusion_model.out.2.weight"] = torch.zeros(4, 16, 3, 3)
    path = tmp_path / "narrow.safetensors"
    save_file(bad, str(path))
    with pytest.raises(SdgenError) as err:
        load_model(bundled_config(CONFIG_SD1), path)
    msg = str(err.value)
    assert "shape mismatches" in msg and "looks like it needs" not in msg


@pytest.mark.parametrize(
    "manifest, expected",
    [
        ("sd-v1-4", CONFIG_SD1),
        ("v2-1_768-ema-pruned", CONFIG_SD2V),
        ("sd21-unclip-l", CONFIG_UNCLIP_L),
        ("sd21-unclip-h", CONFIG_UNCLIP_H),
        ("sd_xl_base_0.9", CONFIG_SDXL_BASE),
        ("sd_xl_refiner_0.9", CONFIG_SDXL_REFINER),
    ],
)
def test_the_config_identified_from_released_manifests(manifest, expected):
    keys = released_manifest(manifest)["keys"]
    assert identify(keys).config == expected
    # keys alone (no shapes) are enough too, except that unCLIP then relies on the image tower layout
    assert identify(list(keys)).config == expected


def test_unknown_keys_identify_nothing():
    unknown = identify(["foo.weight", "bar.bias"])
    assert unknown.kind is None and unknown.config is None and "no rule matches" in unknown.reasons[0]


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(SdgenError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SdgenError, match="not a PyTorch checkpoint .it looks like a text file"):
        read_state_dict(junk)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(SdgenError, match="safetensors"):
        read_state_dict(broken)


def test_load_config_errors(tmp_path):
    with pytest.raises(SdgenError, match="config not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SdgenError, match="invalid config"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SdgenError, match="mapping"):
        load_config(scalar)
    with pytest.raises(SdgenError, match="'model' section"):
        build_model_on_meta(load_config(_write(tmp_path / "empty.yaml", "other: 1\n")))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_model_hash_is_sha256_prefix_and_cached(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    cache = tmp_path / "cache"
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    assert model_hash(f, cache) == expected[:10]
    entries = json.loads((cache / "hashes.json").read_text())
    (key,) = entries
    assert entries[key] == expected
    # the cached digest is used while size and mtime are unchanged ...
    entries[key] = "f" * 64
    (cache / "hashes.json").write_text(json.dumps(entries))
    assert model_hash(f, cache) == "f" * 10
    # ... and recomputed once the file changes
    f.write_bytes(b"other" * 1000)
    assert model_hash(f, cache) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_inert_object_records_state():
    obj = InertObject(1, a=2)
    obj.__setstate__({"k": "v"})
    assert obj.args == (1,) and obj.kwargs == {"a": 2} and obj.state == {"k": "v"}
