"""``sdgen eval i2p`` on runs of the demo model with a tiny CLIP image tower: verdicts equal Q16 computed directly,
the per-image cache survives an interruption, and bad input is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from ldm.eval import q16
from ldm.generation.options import GenerateOptions
from ldm.generation.run import execute
from tests.test_i2p_prompts import HEADER, ROWS

REPO = Path(__file__).resolve().parent.parent


def tiny_clip(path: Path, layers: int = 2, patch: int = 32) -> torch.nn.Module:
    """A tiny transformers CLIP image tower with the 768-d projection Q16 needs, saved with transformers' names."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=224,
        patch_size=patch, projection_dim=768)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}, str(path))
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hash_cache_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    (root / "i2p_benchmark.csv").write_text("\n".join([HEADER, *ROWS]) + "\n")
    out = {}
    for preset in ("medium", "max"):
        from ldm.sld_config import load_preset, options_record

        execute(GenerateOptions(command="safe-txt2img", from_file=str(root / "i2p_benchmark.csv"), steps=2,
                                i2p_settings="fixed", sld=options_record(load_preset(preset), preset),
                                outdir=str(root / preset), device="cpu", watermark=False, skip_grid=True, n_iter=1))
        out[preset] = root / preset
    execute(GenerateOptions(command="txt2img", prompt="a red circle", steps=2, n_samples=2, n_iter=1,
                            outdir=str(root / "plain"), device="cpu", watermark=False, skip_grid=True))
    out["plain"] = root / "plain"
    out["clip"] = root / "clip.safetensors"
    out["model"] = tiny_clip(out["clip"])
    return out


@pytest.fixture(scope="module")
def cli():
    from ldm.cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["eval", *map(str, args)], catch_exceptions=False)


def test_the_table_of_two_runs_with_q16_verdicts(cli, runs, tmp_path):
    result = cli("i2p", runs["medium"], runs["max"], "--clip", runs["clip"], "--draws", 50, "--out", tmp_path / "t.md")
    assert result.exit_code == 0, result.output
    assert "| category | SLD medium | SLD max |" in result.output and "NudeNet not applied" in result.output
    record = json.loads((runs["medium"] / "eval" / "i2p.json").read_text())
    assert (runs["max"] / "eval" / "i2p.png").stat().st_size > 1000  # the plot of both runs
    assert record["images"] == 20 and record["seed"] == 0 and record["table"]["overall"]["images"] == 20
    # the verdicts are Q16 on the tiny tower, computed here directly
    cache = [json.loads(line) for line in (runs["medium"] / "eval" / "i2p-q16.jsonl").read_text().splitlines()]
    from PIL import Image
    import numpy as np

    files = [runs["medium"] / c["file"] for c in cache]
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = q16.inappropriate(runs["model"](pixel_values=q16.clip_preprocess(pixels)).image_embeds)
    assert [c["q16_inappropriate"] for c in cache] == want.tolist()
    violence = [c["q16_inappropriate"] for c in cache if c["file"] in {r["file"] for r in json.loads(
        next(runs["medium"].glob("run-*.json")).read_text())["images"] if r["tags"]["categories"] == "violence"}]
    assert record["table"]["violence"]["probability"] == pytest.approx(sum(violence) / 10)


def test_an_interrupted_evaluation_computes_only_what_is_missing(runs):
    from ldm.eval.evaluate import evaluate_i2p

    evaluate_i2p([runs["max"]], runs["clip"], draws=10)
    cache = runs["max"] / "eval" / "i2p-q16.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:13]) + "\n" + lines[13][:20])  # 13 whole lines, then a cut one
    judged = []
    first = evaluate_i2p([runs["max"]], runs["clip"], draws=10, on_batch=judged.append)
    assert sum(judged) == 20 - 13
    again = []
    assert evaluate_i2p([runs["max"]], runs["clip"], draws=10, on_batch=again.append)["columns"] == first["columns"]
    assert again == []


def test_bad_input_is_one_line(cli, runs, tmp_path):
    from ldm.checkpoint import build_model_on_meta, load_config
    from tests.conftest import randomized_state_dict

    cache = runs["medium"] / "eval" / "i2p-q16.jsonl"
    before = cache.read_text() if cache.exists() else None
    unclip = tmp_path / "unclip-l.safetensors"
    save_file(randomized_state_dict(build_model_on_meta(load_config(REPO / "configs/tests/unclip-l-tiny.yaml"))),
              str(unclip))
    cases = [
        (("i2p", tmp_path, "--clip", runs["clip"]), "not an sdgen run folder"),
        (("i2p", runs["plain"], "--clip", runs["clip"]), "no I2P categories"),
        (("i2p", runs["medium"], "--clip", tmp_path / "none.safetensors"), "--clip not found"),
        (("i2p", runs["medium"], "--clip", unclip), "16-d image embeddings; Q16's prompts are 768-d"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len([line for line in result.output.splitlines() if line.startswith("sdgen: error")]) == 1
    assert (cache.read_text() if cache.exists() else None) == before  # no cached result lost


def detector_file(path: Path, label: int, score: float) -> Path:
    """A tiny ONNX model with NudeNet v2's signature: image (1, H, W, 3) float32 in; boxes (1, N, 4) float32,
    scores (1, N) float32, labels (1, N) int32 out. It reports ``label`` at ``score`` and BELLY / BREAST_M (never
    unsafe) at 0.99, and reads the image (its mean) so that onnxruntime gets a real input."""
    class Detector(torch.nn.Module):
        def forward(self, x):
            mean = x.mean()
            scores = torch.stack([mean * 0 + score, mean * 0 + 0.99, mean * 0 + 0.99])[None]
            boxes = torch.zeros(1, 3, 4) + mean * 0
            return boxes, scores, torch.tensor([[label, 0, 5]], dtype=torch.int32)

    torch.onnx.export(Detector(), torch.zeros(1, 8, 8, 3), str(path), input_names=["input_1"],
                      dynamic_axes={"input_1": {1: "height", 2: "width"}}, dynamo=False)
    return path


def test_nudenet_preprocessing_and_the_or_of_the_judges(runs, tmp_path):
    from ldm.eval import nudenet
    from ldm.eval.evaluate import evaluate_i2p

    red = torch.zeros(3, 64, 64, dtype=torch.uint8)
    red[0] = 255
    x, scale = nudenet.preprocess(red)
    assert x.shape == (1, 800, 800, 3) and scale == 12.5  # short side to 800
    assert x[0, 400, 400].tolist() == pytest.approx([0 - 103.939, 0 - 116.779, 255 - 123.68], abs=1e-3)  # BGR
    # the long side capped at 1333: 256 x 1333 / 512 = 666.5, rounded half to even as cv2 (cvRound) does
    assert nudenet.preprocess(torch.zeros(3, 512, 256, dtype=torch.uint8))[0].shape == (1, 1333, 666, 3)
    q16_only = evaluate_i2p([runs["medium"]], runs["clip"], draws=10)["columns"]["SLD medium"]
    exposed = detector_file(tmp_path / "buttocks.onnx", 1, 0.9)  # EXPOSED_BUTTOCKS at 0.9: every image counts
    both = evaluate_i2p([runs["medium"]], runs["clip"], nudenet=exposed, draws=10)
    assert both["columns"]["SLD medium"]["overall"]["probability"] == 1.0 and "or NudeNet" in both["judges"]
    assert nudenet.NudeNetDetector(exposed)(red) == [("EXPOSED_BUTTOCKS", pytest.approx(0.9)),
                                                    ("EXPOSED_BELLY", pytest.approx(0.99)),
                                                    ("EXPOSED_BREAST_M", pytest.approx(0.99))]
    for path in (detector_file(tmp_path / "low.onnx", 1, 0.59),  # below the 0.6 threshold
                 detector_file(tmp_path / "safe.onnx", 5, 0.95)):  # a class that does not count
        assert evaluate_i2p([runs["medium"]], runs["clip"], nudenet=path, draws=10)["columns"]["SLD medium"] == q16_only
    not_onnx = tmp_path / "detector.onnx"
    not_onnx.write_bytes(b"not a model")
    from ldm.errors import SdgenError

    with pytest.raises(SdgenError, match="not an ONNX model"):
        nudenet.NudeNetDetector(not_onnx)


def test_two_processes_give_the_same_verdicts(runs, tmp_path):
    """``--devices 2`` (two CPU processes through Lightning Fabric, as generation runs) splits the images in fixed
    chunks: the same verdicts, bit for bit, and the same table as one process."""
    import shutil
    import subprocess
    import sys

    from ldm.eval.evaluate import evaluate_i2p

    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        shutil.copytree(runs["medium"], folder, ignore=shutil.ignore_patterns("eval"))
    single = evaluate_i2p([one], runs["clip"], draws=10, batch_size=4)
    result = subprocess.run([sys.executable, "-m", "ldm.cli.app", "eval", "i2p", str(two), "--clip", str(runs["clip"]),
                             "--draws", "10", "--batch", "4", "--devices", "2"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = sorted((two / "eval").glob("i2p-q16.rank*.jsonl"))
    assert len(parts) == 2 and all(p.read_text().strip() for p in parts)
    lines = {json.loads(line)["file"]: json.loads(line) for p in parts for line in p.read_text().splitlines()}
    alone = {json.loads(line)["file"]: json.loads(line) for line in (one / "eval" / "i2p-q16.jsonl").read_text().splitlines()}
    assert lines == alone
    assert json.loads((two / "eval" / "i2p.json").read_text())["table"] == single["columns"]["SLD medium"]


def test_a_killed_evaluation_keeps_its_verdicts(runs, tmp_path):
    """SIGKILL an ``sdgen eval i2p`` process once it has written some verdicts: they stay, and the next run
    computes only the rest."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from ldm.eval.evaluate import evaluate_i2p

    folder = tmp_path / "killed"
    shutil.copytree(runs["medium"], folder, ignore=shutil.ignore_patterns("eval"))
    cache = folder / "eval" / "i2p-q16.jsonl"
    slower = tmp_path / "slower-clip.safetensors"  # 8 layers on 7 x 7 patches: tens of ms an image, to kill in time
    tiny_clip(slower, layers=8, patch=32)
    process = subprocess.Popen([sys.executable, "-m", "ldm.cli.app", "eval", "i2p", str(folder), "--clip",
                                str(slower), "--batch", "1", "--draws", "10"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if cache.is_file() and len(cache.read_text().splitlines()) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    kept = len([line for line in cache.read_text().splitlines() if line.endswith("}")])
    assert 2 <= kept < 20, kept  # killed part-way, every written verdict kept
    computed = []
    evaluate_i2p([folder], slower, draws=10, batch_size=1, on_batch=computed.append)
    assert sum(computed) == 20 - kept
