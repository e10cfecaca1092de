"""FID / KID / CLIP score of runs (ldm.eval.metrics) against torchmetrics called directly, on tiny networks, and
``--by`` grouping over a sweep."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ldm.eval import metrics
from ldm.eval.runs import read_images, read_run
from ldm.generation.options import GenerateOptions
from ldm.generation.run import execute


class TinyFeatures(nn.Module):
    """uint8 images -> 6 features (per-channel mean and std): a stand-in for Inception."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, hash_cache_dir):
    root = tmp_path_factory.mktemp("metrics")
    execute(GenerateOptions(command="txt2img", prompt="a red circle", steps=2, n_samples=3, n_iter=1,
                            sweep=["scale=2,6"], outdir=str(root / "run"), device="cpu", watermark=False))
    execute(GenerateOptions(command="txt2img", prompt="a blue square", steps=2, n_samples=4, n_iter=1, seed=9,
                            outdir=str(root / "ref"), device="cpu", watermark=False, skip_grid=True))
    return read_run(root / "run"), root / "ref" / "samples"


def test_fid_and_kid_equal_torchmetrics_per_scale(sweep):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from ldm.eval.features import read_resized, reference_run

    run, ref_folder = sweep
    reference = read_resized(reference_run(ref_folder).images)
    torch.manual_seed(0)  # KID draws its subsets from torch's global generator (torchmetrics)
    rows = metrics.fid_kid(run, ref_folder, TinyFeatures(), "tiny", setting="scale")
    assert list(rows) == [2.0, 6.0] and rows[2.0]["images"] == 3
    for scale, row in rows.items():
        images = read_images([i for i in run.images if metrics.setting_of(i, "scale") == scale])
        fid = FrechetInceptionDistance(feature=TinyFeatures())
        kid = KernelInceptionDistance(feature=TinyFeatures(), subset_size=3)
        for metric in (fid, kid):
            metric.set_dtype(torch.float64)
            metric.update(reference, real=True)
            metric.update(images, real=False)
        # torchmetrics returns its result in the features' dtype: float32 here, float64 from the cached features
        assert row["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
        if scale == 2.0:  # the first group drew the same subsets as this one: the same numbers
            torch.manual_seed(0)
            # KID's polynomial kernel runs in the features' dtype: float32 there (measured 4.3e-6 apart)
            assert (row["kid_mean"], row["kid_std"]) == pytest.approx(tuple(float(v) for v in kid.compute()), rel=2e-5)
    assert rows[2.0]["fid"] != rows[6.0]["fid"]  # the groups really are the scales' images
    with pytest.raises(Exception, match="--by colour: not a setting"):
        metrics.groups(run, "colour")
    # the features are cached per chunk: a lost chunk is computed again, the others are not
    chunk = next((run.folder / "eval" / "features-tiny").glob("chunk-*.npy"))
    chunk.unlink()
    computed = []
    torch.manual_seed(0)
    again = metrics.fid_kid(run, ref_folder, TinyFeatures(), "tiny", setting="scale", on_chunk=computed.append)
    assert computed == [6] and again[2.0] == rows[2.0]


def test_clip_score_equals_torchmetrics(sweep, tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ldm.modules.encoders.tokenizer import hf_clip_tokenizer

    run, _ = sweep
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
                        projection_dim=16)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=hf_clip_tokenizer())
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    rows = metrics.clip_score(run, metrics.clip_model_loader(tmp_path / "clip"), "tiny-clip")
    direct = CLIPScore(model_name_or_path=lambda: (model, processor))
    direct.update(list(read_images(run.images)), [i.prompt for i in run.images])
    assert rows["all"]["clip_score"] == pytest.approx(float(direct.compute()), rel=1e-5)
    assert rows["all"]["images"] == 6
    # the command: one row per scale, and the plot
    from typer.testing import CliRunner

    from ldm.cli.app import app

    result = CliRunner().invoke(app, ["eval", "clip-score", str(run.folder), "--clip", str(tmp_path / "clip"), "--by",
                                      "scale", "--out", str(tmp_path / "table.md")])
    assert result.exit_code == 0, result.output
    assert "| 2.0 |" in result.output and "| 6.0 |" in result.output
    assert (run.folder / "eval" / "clip-score-by-scale.png").is_file()
    # per-image scores are cached: a lost line is computed again, and only it
    cache = run.folder / "eval" / "clip-score.jsonl"
    lines = [line for line in cache.read_text().splitlines() if json.loads(line)["key"] == "tiny-clip"]
    cache.write_text("\n".join(lines[:-1]) + "\n")
    computed = []
    again = metrics.clip_score(run, metrics.clip_model_loader(tmp_path / "clip"), "tiny-clip", on_chunk=computed.append)
    assert computed == [1] and again == rows


def test_bad_metric_inputs(sweep, tmp_path):
    from ldm.errors import SdgenError

    run, ref = sweep
    with pytest.raises(SdgenError, match="--inception not found"):
        metrics.inception(tmp_path / "none.pth")
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(SdgenError, match="not torch-fidelity's Inception weights"):
        metrics.inception(bad)
    from ldm.eval.features import reference_run

    with pytest.raises(SdgenError, match="holds no images"):
        reference_run(tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(ref.glob("*.png")).read_bytes())
    with pytest.raises(SdgenError, match="at least 2 reference images"):
        reference_run(one)
    with pytest.raises(SdgenError, match="transformers CLIP folder"):
        metrics.clip_model_loader(tmp_path)


def test_by_setting_plots_one_line_per_metric(sweep, tmp_path):
    run, ref = sweep
    rows = {2.0: {"fid": 10.0, "kid_mean": 0.1, "kid_std": 0.01, "images": 3},
            6.0: {"fid": 12.0, "kid_mean": 0.2, "kid_std": 0.02, "images": 3}}
    assert metrics.plot_by(rows, "scale", tmp_path / "fid.png") and (tmp_path / "fid.png").stat().st_size > 1000
    assert metrics.markdown(rows, "scale").splitlines()[0] == "| scale | fid | images | kid_mean | kid_std |"
