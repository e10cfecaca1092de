"""Batch runs at scale: prompt files with per-line settings, sweeps, resume after a killed run, and several
processes (Lightning Fabric) giving the same images as one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm.cli.app import app
from ldm.errors import SdgenError
from ldm.generation.distributed import World, check_same_run, check_shared_folder
from ldm.generation.jobs import parse_sweep, sweep_cells
from ldm.generation.prompt_file import read_prompt_file
from ldm.output import load_manifest, png_pixels, read_parameters

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def samples(folder: Path) -> list[np.ndarray]:
    return [png_pixels(p) for p in sorted((folder / "samples").glob("*.png"))]


def sdgen(*args, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ldm.cli.app", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def tiny(tiny_checkpoint, tiny_config) -> list[str]:
    return ["--ckpt", tiny_checkpoint, "--config", tiny_config, "--device", "cpu", "--H", "16", "--W", "16"]


# ----------------------------------------------------------------------------- prompt files


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n\n  a blue sphere  \n")
    assert [e.prompt for e in read_prompt_file(tmp_path / "p.txt")] == ["a red cube", "a blue sphere"]
    (tmp_path / "p.csv").write_text('prompt,steps,scale,H,negative_prompt\n"a cube, red",4,,32,\nsphere,,9.5,,dark\n')
    first, second = read_prompt_file(tmp_path / "p.csv")
    assert first.prompt == "a cube, red" and first.overrides == {"steps": 4, "height": 32, "negative_prompt": ""}
    assert second.overrides == {"scale": 9.5, "negative_prompt": "dark"} and second.where == "p.csv:3"
    (tmp_path / "p.jsonl").write_text('{"prompt": "cube", "seed": 7, "sampler": "euler"}\n\n{"prompt": "x"}\n')
    entries = read_prompt_file(tmp_path / "p.jsonl")
    assert entries[0].overrides == {"seed": 7, "sampler": "euler"} and entries[1].where == "p.jsonl:3"


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "prompt,steps\nx,abc\n", "a.csv:2: steps must be an integer, got 'abc'"),
    ("b.csv", "prompt,colour\nx,red\n", "b.csv:1: unknown field 'colour'"),
    ("c.csv", "text,steps\nx,3\n", "c.csv:1: the header row must name a 'prompt' column"),
    ("d.csv", "prompt,steps\nx,3,4\n", "d.csv:2: more cells than the header has columns"),
    ("e.jsonl", '{"prompt": "x"}\n[1, 2]\n', "e.jsonl:2: not a JSON object"),
    ("f.jsonl", '{"prompt": "x"}\n{"prompt": "y", "seed": 1.5}\n', "f.jsonl:2: seed must be an integer"),
    ("g.jsonl", '{"steps": 3}\n', "g.jsonl:1: the line has no prompt"),
    ("h.jsonl", '{"prompt": "x"\n', "h.jsonl:1: not a JSON object"),
])
def test_bad_prompt_lines_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(SdgenError) as info:
        read_prompt_file(tmp_path / name)
    assert str(info.value).startswith(message), str(info.value)


def test_per_line_settings_reach_the_images(tmp_path, tiny, monkeypatch):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,steps,scale,seed,n_samples\na red cube,,,,\na blue sphere,4,2.5,100,2\n")
    out = tmp_path / "out"
    result = invoke("txt2img", "--from-file", prompts, *tiny, "--steps", "2", "--n_samples", "2", "--n_iter", "1",
                    "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    manifest = load_manifest(out / "run-0000.json")
    assert [(r["prompt"], r["seed"]) for r in manifest["images"]] == [
        ("a red cube", 42), ("a blue sphere", 100), ("a blue sphere", 101)]  # a line's own seed and count
    assert len(manifest["settings_groups"]) == 2
    first, second = (read_parameters(out / "samples" / f"0000{k}.png") for k in (0, 1))
    assert (first["Steps"], first["CFG scale"]) == ("2", "7.5") and (second["Steps"], second["CFG scale"]) == ("4",
                                                                                                              "2.5")
    assert second["Batch size"] == "2"
    # every line is checked against the model before it is loaded, and named
    import ldm.checkpoint

    monkeypatch.setattr(ldm.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    prompts.write_text("prompt,H\nfine,16\ntoo odd,20\n")
    result = invoke("txt2img", "--from-file", prompts, *tiny[:-4], "--outdir", tmp_path / "bad")
    assert result.exit_code == 2
    assert result.stderr.strip() == "sdgen: error: p.csv:3: --H must be a positive multiple of 8, got 20"


# ----------------------------------------------------------------------------- sweeps


def test_sweep_parsing():
    assert parse_sweep("scale=4, 6,8").values == (4.0, 6.0, 8.0)
    assert parse_sweep("sampler=ddim,euler").values == ("ddim", "euler")
    assert [c for c in sweep_cells([parse_sweep("scale=4,6"), parse_sweep("steps=2,3")])] == [
        {"steps": 2, "scale": 4.0}, {"steps": 2, "scale": 6.0}, {"steps": 3, "scale": 4.0}, {"steps": 3, "scale": 6.0}]
    for bad, message in (("prompt=a,b", "FIELD one of"), ("scale=", "no values"), ("steps=2,x", "an integer"),
                         ("scale=4,4", "repeats")):
        with pytest.raises(SdgenError, match=message):
            parse_sweep(bad)


def test_sweep_runs_every_cell_over_the_same_seeds_and_labels_the_grid(tmp_path, tiny):
    out = tmp_path / "out"
    result = invoke("txt2img", "a red cube", *tiny, "--steps", "2", "--n_samples", "2", "--n_iter", "1",
                    "--sweep", "scale=3,6,9", "--sweep", "steps=2,4", "--outdir", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    manifest = load_manifest(out / "run-0000.json")
    assert [r["seed"] for r in manifest["images"]] == [42, 43] * 6  # the same seeds in every cell
    params = [read_parameters(p) for p in sorted((out / "samples").glob("*.png"))]
    assert [(p["CFG scale"], p["Steps"]) for p in params[::2]] == [
        ("3.0", "2"), ("6.0", "2"), ("9.0", "2"), ("3.0", "4"), ("6.0", "4"), ("9.0", "4")]
    images = samples(out)
    assert not np.array_equal(images[0], images[2])  # scale reached the model
    with Image.open(out / "grid-0000.png") as grid:
        grid = np.asarray(grid.convert("RGB"))
    # 3 columns of 2 images of 16 px and 2 rows, plus labels: larger than the bare tiles, white margins
    assert grid.shape[1] > 3 * 2 * 16 and grid.shape[0] > 2 * 16 and (grid[:5] == 255).all()
    assert manifest["sweeps"] == [{"field": "scale", "values": [3.0, 6.0, 9.0]}, {"field": "steps", "values": [2, 4]}]


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_killed_run_makes_only_the_missing_images(tmp_path, tiny):
    common = ["txt2img", "a red cube", *tiny, "--steps", "6", "--n_samples", "1", "--n_iter", "10", "--threads", "1"]
    proc = sdgen(*common, "--outdir", "out", cwd=tmp_path)
    folder = tmp_path / "out" / "samples"
    deadline = time.monotonic() + 240
    while len(list(folder.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a machine lost: no clean-up at all
    proc.communicate()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("*.png")}
    assert 3 <= len(kept) < 10, kept.keys()
    manifest = load_manifest(tmp_path / "out" / "run-0000.json")  # whole, not half-written
    assert manifest["status"] == "running"

    result = invoke(*common, "--outdir", tmp_path / "out", "--resume")
    assert result.exit_code == 0, (result.stderr, result.exception)
    for name, (mtime, data) in kept.items():  # the images already there are not made again
        assert (folder / name).stat().st_mtime_ns == mtime and (folder / name).read_bytes() == data
    manifest = load_manifest(tmp_path / "out" / "run-0000.json")
    assert manifest["status"] == "complete" and [r["index"] for r in manifest["images"]] == list(range(10))
    assert not list((tmp_path / "out").glob("*.part-*.jsonl"))
    assert invoke(*common, "--outdir", tmp_path / "whole").exit_code == 0
    for a, b in zip(samples(tmp_path / "out"), samples(tmp_path / "whole"), strict=True):
        np.testing.assert_array_equal(a, b)

    changed = invoke(*common, "--scale", "3", "--outdir", tmp_path / "out", "--resume")
    assert changed.exit_code == 2 and changed.stderr.strip().startswith(
        "sdgen: error: --resume: samples/00000.png was made with settings.scale 7.5 (now 3.0)")
    empty = invoke(*common, "--outdir", tmp_path / "empty", "--resume")
    assert empty.exit_code == 2 and "holds no run manifest" in empty.stderr


# ----------------------------------------------------------------------------- processes


def test_two_processes_give_the_images_of_one(tmp_path):
    """The demo model, 1 vs 2 CPU processes (gloo) at one thread each: the same images bit for bit, one manifest."""
    common = ["txt2img", "a red circle on a white background", "--steps", "6", "--n_samples", "1", "--n_iter", "4",
              "--threads", "1"]
    one = sdgen(*common, "--outdir", "one", cwd=tmp_path)
    two = sdgen(*common, "--outdir", "two", "--devices", "2", cwd=tmp_path)
    for proc in (one, two):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert err.count("demo model") == 1, err  # one notice, from process 0
    a, b = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    manifest = load_manifest(tmp_path / "two" / "run-0000.json")
    assert manifest["status"] == "complete" and [r["index"] for r in manifest["images"]] == [0, 1, 2, 3]
    assert not list((tmp_path / "two").glob("*.part-*.jsonl"))


def test_processes_that_never_connect_time_out_with_one_line(tmp_path):
    proc = sdgen("txt2img", "x", "--num-nodes", "2", "--dist-timeout", "3", "--outdir", "out", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith(
        "sdgen: error: the 2 processes did not all connect within 3 s"), err


def test_more_devices_than_gpus_is_refused(tmp_path):
    result = invoke("txt2img", "x", "--devices", "64", "--accelerator", "cuda", "--outdir", tmp_path)
    assert result.exit_code == 2 and "asks for more GPUs than this machine has" in result.stderr


class FakeWorld(World):
    """Two processes whose collectives return the given values for process 1."""

    def __init__(self, other):
        super().__init__(rank=0, size=2)
        self.other = other
        self.calls = 0

    def gather(self, value):
        self.calls += 1
        other = self.other(self.calls, value)
        return [value, other]

    def broadcast(self, value):
        return value


def test_processes_must_run_the_same_sdgen_on_the_same_files(tmp_path):
    check_same_run(FakeWorld(lambda n, v: dict(v)), {"checkpoints": ["aa"]})  # identical: fine
    with pytest.raises(SdgenError, match="process 1 differs from process 0 in its checkpoints"):
        check_same_run(FakeWorld(lambda n, v: {**v, "checkpoints": ["bb"]}), {"checkpoints": ["aa"]})
    with pytest.raises(SdgenError, match="process 1 differs from process 0 in its sdgen version"):
        check_same_run(FakeWorld(lambda n, v: {**v, "sdgen": "9.9"}), {"checkpoints": ["aa"]})


def test_an_output_folder_that_is_not_shared_is_refused(tmp_path):
    check_shared_folder(FakeWorld(lambda n, v: v), tmp_path)
    with pytest.raises(SdgenError, match="is not shared between the machines: process 1"):
        check_shared_folder(FakeWorld(lambda n, v: False if n == 2 else v), tmp_path)
    assert not list(tmp_path.glob(".sdgen-shared-*"))
