"""--offload (ldm/generation/offload.py): parts move to the GPU only while they run, one at a time; the images
are the same; a CPU run refuses the flag. (No GPU here: the moves are recorded, the device is the CPU.)"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ldm.generation.offload import ModelOffload, offload_model
from tests.test_inference import images, tiny


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.unet = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.vae = nn.Linear(4, 2)
        self.register_buffer("schedule", torch.arange(3.0))


def recorder():
    moves = []
    return moves, lambda module, device: moves.append((module, device.type))


def test_one_part_at_a_time_and_a_part_stays_while_it_is_called_again():
    model = Toy()
    moves, move = recorder()
    offload = ModelOffload(model, torch.device("cpu"), move=move)
    assert [m for m, _ in moves] == [model.text, model.unet, model.vae]  # all start at home
    moves.clear()
    x = torch.randn(2, 4)
    h = model.text(x)
    for _ in range(3):  # the sampling steps: no moves after the first
        h = model.unet(h)
    model.vae(h)
    # text in; text out, UNet in (once for all the steps); UNet out, VAE in
    assert [m for m, _ in moves] == [model.text, model.text, model.unet, model.unet, model.vae]
    assert offload.resident is model.vae
    model.unet[1](h)  # a call into an inner module brings its whole part
    assert offload.resident is model.unet
    offload.release()
    model.text(x)
    assert offload.resident is None  # hooks gone


def test_an_offloaded_model_makes_the_same_images_and_names_the_gpu_as_its_device():
    plain, offloaded = tiny("sd1-tiny"), tiny("sd1-tiny")
    want = images(plain, 16, "full")
    moves, move = recorder()
    offload = offload_model(offloaded, torch.device("cpu"), move=move)
    assert offloaded.device == offload.device
    moves.clear()
    got = images(offloaded, 16, "full")
    assert np.array_equal(got, want)
    # text encoder in and out, UNet in (for all the steps) and out, VAE in: each part brought once per batch
    assert [part for part, _ in moves] == [offloaded.cond_stage_model, offloaded.cond_stage_model,
                                           offloaded.model, offloaded.model, offloaded.first_stage_model]
    offload.release()
    assert not hasattr(offloaded, "offload") and offloaded.device == torch.device("cpu")


def test_offload_on_the_cpu_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from ldm.cli.app import app

    result = CliRunner().invoke(app, ["txt2img", "a red circle", "--offload", "--device", "cpu", "--steps", "2",
                                      "--outdir", str(tmp_path), "--no-watermark"])
    assert result.exit_code == 2, result.output
    assert "--offload moves the model's parts to a GPU" in result.output
    assert "Traceback" not in result.output
