"""``sdgen train``: Lightning training of the autoencoder and the latent diffusion model on tiny configs
(a few steps each), checkpoint layout, resume, the learning-rate schedule, EMA, and bad-input errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from ldm.checkpoint import load_config, load_model
from ldm.checkpoint_reader import read_state_dict
from ldm.cli.app import app
from ldm.training.lr_scheduler import LambdaLinearScheduler

REPO = Path(__file__).resolve().parent.parent

TINY_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
TINY_DATA = {"target": "ldm.demo.shapes.ShapesDataModule",
             "params": {"batch_size": 2, "train": {"length": 64, "resolution": 32, "seed": 0}}}


def ae_config() -> dict:
    return copy.deepcopy({
        "model": {"base_learning_rate": 1.0e-3, "target": "ldm.models.autoencoder.AutoencoderKL",
                  "params": {"embed_dim": 4, "ddconfig": TINY_DDCONFIG,
                             "lossconfig": {"target": "ldm.training.trainers.ReconstructionKLLoss",
                                            "params": {"kl_weight": 1.0e-6}}}},
        "data": TINY_DATA,
        "training": {"crop_size": 16, "checkpoint_every_n_steps": 1, "ema_decay": 0.9},
        "lightning": {"trainer": {"max_steps": 2, "log_every_n_steps": 1}},
    })


def ldm_config(first_stage: Path) -> dict:
    demo = OmegaConf.to_container(OmegaConf.load(REPO / "configs/demo/shapes-ldm.yaml"))
    params = demo["model"]["params"]
    params["image_size"] = 16
    params["unet_config"]["params"].update(image_size=16, model_channels=32, channel_mult=[1, 2],
                                           attention_resolutions=[2], context_dim=32)
    params["first_stage_config"]["params"]["ddconfig"] = TINY_DDCONFIG
    params["cond_stage_config"]["params"]["text_config"].update(hidden_size=32, intermediate_size=64,
                                                                projection_dim=32, num_hidden_layers=1)
    params["scheduler_config"]["params"].update(warm_up_steps=[1], cycle_lengths=[4])
    demo["data"] = copy.deepcopy(TINY_DATA)
    demo["training"] = {"first_stage_weights": str(first_stage), "ema_decay": 0.9, "checkpoint_every_n_steps": 1,
                        "noise_offset": 0.1}
    demo["lightning"] = {"trainer": {"max_steps": 2, "log_every_n_steps": 1}}
    return demo


def write(path: Path, cfg: dict) -> Path:
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


def train(*args) -> object:
    return CliRunner().invoke(app, ["train", *[str(a) for a in args]])


def assert_error(result, match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step autoencoder run and a 2-step LDM run on top of it."""
    root = tmp_path_factory.mktemp("train")
    ae_cfg = write(root / "ae.yaml", ae_config())
    result = train("--base", ae_cfg, "--logdir", root / "logs", "--name", "ae", "--seed", 1, "--num-threads", 1)
    assert result.exit_code == 0, (result.output, result.exception)
    ae_weights = root / "logs/ae/weights/last.safetensors"
    ldm_cfg = write(root / "ldm.yaml", ldm_config(ae_weights))
    result = train("--base", ldm_cfg, "--logdir", root / "logs", "--name", "ldm", "--seed", 1, "--num-threads", 1,
                   "--accelerator", "cpu", "--devices", "1", "--export", root / "ldm-fp16.safetensors",
                   "--export-dtype", "float16")
    assert result.exit_code == 0, (result.output, result.exception)
    return root


def test_autoencoder_run_outputs_released_layout(trained):
    run = trained / "logs/ae"
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} >= {"step-000001.ckpt", "step-000002.ckpt", "last.ckpt"}
    weights = read_state_dict(run / "weights/last.safetensors")
    assert {k.split(".")[0] for k in weights} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    keys = set(ckpt["state_dict"])
    assert set(weights) <= keys and "training.loss.logvar" in keys
    assert any(k.startswith("model_ema.") for k in keys)
    metrics = (run / "metrics.csv").read_text()
    assert "train/loss" in metrics and "train/rec_loss" in metrics


def test_autoencoder_weights_changed_and_ema_differs(trained):
    from ldm.util import instantiate_from_config

    cfg = load_config(trained / "ae.yaml")
    torch.manual_seed(0)
    fresh = instantiate_from_config(cfg.model).state_dict()
    weights = read_state_dict(trained / "logs/ae/weights/last.safetensors")
    raw = torch.load(trained / "logs/ae/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    key = "decoder.conv_out.weight"
    assert not torch.equal(weights[key], raw[key])  # the export holds the EMA, the checkpoint the raw weights
    assert raw["model_ema.decoderconv_outweight"].shape == fresh[key].shape
    assert torch.equal(weights[key], raw["model_ema.decoderconv_outweight"])


def test_ldm_checkpoint_loads_for_inference(trained):
    run = trained / "logs/ldm"
    cfg = load_config(trained / "ldm.yaml")
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    for prefix in ("model.diffusion_model.", "first_stage_model.encoder.", "cond_stage_model.transformer.text_model.",
                   "model_ema."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"betas", "alphas_cumprod", "scale_factor"} <= keys
    scale = float(ckpt["state_dict"]["scale_factor"])
    assert scale != 1.0 and math.isfinite(scale)  # scale_by_std set it from the first batch
    # the first stage is the trained autoencoder's (frozen), the text encoder was trained (cond_stage_trainable)
    ae = read_state_dict(trained / "logs/ae/weights/last.safetensors")
    assert torch.equal(ckpt["state_dict"]["first_stage_model.decoder.conv_out.weight"], ae["decoder.conv_out.weight"])
    fp16 = read_state_dict(trained / "ldm-fp16.safetensors")
    assert fp16["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert fp16["betas"].dtype == torch.float32 and fp16["scale_factor"].dtype == torch.float32
    for path in (run / "checkpoints/last.ckpt", run / "weights/last.safetensors", trained / "ldm-fp16.safetensors"):
        model = load_model(cfg, path)  # strict: the released layout, nothing missing
        assert float(model.scale_factor) == pytest.approx(scale)


def test_ldm_txt2img_from_trained_checkpoint(trained, tmp_path):
    result = CliRunner().invoke(app, ["txt2img", "--prompt", "a red circle", "--config", str(trained / "ldm.yaml"),
                                      "--ckpt", str(trained / "logs/ldm/checkpoints/last.ckpt"), "--H", "32",
                                      "--W", "32", "--steps", "2", "--n_samples", "1", "--n_iter", "1",
                                      "--outdir", str(tmp_path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_decoder_fine_tuning_keeps_the_encoder(trained):
    cfg = ae_config()
    cfg["training"].update(init_weights=str(trained / "logs/ae/weights/last.safetensors"), freeze_encoder=True)
    cfg["training"].pop("ema_decay")
    result = train("--base", write(trained / "dec.yaml", cfg), "--logdir", trained / "logs", "--name", "dec",
                   "--num-threads", 1)
    assert result.exit_code == 0, (result.output, result.exception)
    before = read_state_dict(trained / "logs/ae/weights/last.safetensors")
    after = read_state_dict(trained / "logs/dec/weights/last.safetensors")
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == key.startswith(("encoder.", "quant_conv.")), key


def test_ldm_continues_from_exported_weights(trained):
    cfg = OmegaConf.to_container(OmegaConf.load(trained / "ldm.yaml"))
    cfg["training"] = {"init_weights": str(trained / "logs/ldm/weights/last.safetensors"), "ema_decay": 0.9}
    cfg["lightning"]["trainer"]["max_steps"] = 1
    result = train("--base", write(trained / "ldm-cont.yaml", cfg), "--logdir", trained / "logs", "--name",
                   "ldm-cont", "--num-threads", 1)
    assert result.exit_code == 0, (result.output, result.exception)
    before = read_state_dict(trained / "logs/ldm/weights/last.safetensors")
    after = read_state_dict(trained / "logs/ldm-cont/weights/last.safetensors")
    assert torch.equal(before["scale_factor"], after["scale_factor"])  # kept, not re-estimated
    assert torch.equal(before["first_stage_model.decoder.conv_out.weight"], after["first_stage_model.decoder.conv_out.weight"])
    assert not torch.equal(before["model.diffusion_model.out.2.weight"], after["model.diffusion_model.out.2.weight"])


def test_resume_continues_from_the_checkpoint(trained):
    run = trained / "logs/ae"
    result = train("--base", trained / "ae.yaml", "--logdir", trained / "logs", "--name", "ae-resumed",
                   "--resume", run / "checkpoints/step-000001.ckpt", "--max-steps", 3, "--num-threads", 1)
    assert result.exit_code == 0, (result.output, result.exception)
    ckpt = torch.load(trained / "logs/ae-resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3


def test_resume_checkpoint_must_match_the_config(trained):
    result = train("--base", trained / "ldm.yaml", "--logdir", trained / "logs", "--name", "bad",
                   "--resume", trained / "logs/ae/checkpoints/last.ckpt", "--max-steps", 3)
    assert_error(result, "does not match the config's model")
    result = train("--base", trained / "ae.yaml", "--logdir", trained / "logs", "--name", "bad",
                   "--resume", trained / "nope.ckpt")
    assert_error(result, "resume checkpoint not found")


def test_bad_configs_are_one_line_errors(tmp_path):
    cfg = ae_config()
    cfg["model"]["target"] = "ldm.models.nonexistent.Autoencoder"
    assert_error(train("--base", write(tmp_path / "a.yaml", cfg), "--logdir", tmp_path), "not found")
    cfg = ae_config()
    cfg["data"]["target"] = "ldm.demo.shapes.NoSuchData"
    assert_error(train("--base", write(tmp_path / "b.yaml", cfg), "--logdir", tmp_path), "has no 'NoSuchData'")
    cfg = ae_config()
    cfg["model"]["base_learning_rate"] = "fast"
    assert_error(train("--base", write(tmp_path / "c.yaml", cfg), "--logdir", tmp_path), "base_learning_rate")
    cfg = ae_config()
    cfg["lightning"]["trainer"]["max_steps"] = "ten"
    assert_error(train("--base", write(tmp_path / "d.yaml", cfg), "--logdir", tmp_path), "max_steps")
    cfg = ae_config()
    cfg["data"]["params"]["batch_size"] = 2.5
    assert_error(train("--base", write(tmp_path / "e.yaml", cfg), "--logdir", tmp_path), "batch_size")
    cfg = ae_config()
    cfg["model"]["params"]["embed_dim"] = "four"
    assert_error(train("--base", write(tmp_path / "f.yaml", cfg), "--logdir", tmp_path),
                 "model.params.embed_dim must be an integer")
    cfg = ae_config()
    cfg["model"]["params"]["ddconfig"]["ch_mult"] = "1,2"
    assert_error(train("--base", write(tmp_path / "f2.yaml", cfg), "--logdir", tmp_path), "ch_mult must be a list")
    cfg = ae_config()
    cfg["model"]["params"]["bogus"] = 1
    assert_error(train("--base", write(tmp_path / "f3.yaml", cfg), "--logdir", tmp_path), "bogus")
    cfg = ae_config()
    cfg["training"]["crop_size"] = "big"
    assert_error(train("--base", write(tmp_path / "g.yaml", cfg), "--logdir", tmp_path), "crop_size")
    assert_error(train("--base", tmp_path / "missing.yaml", "--logdir", tmp_path), "missing.yaml")
    cfg = ae_config()
    cfg["training"]["noise_offset"] = -1
    assert_error(train("--base", write(tmp_path / "i.yaml", cfg), "--logdir", tmp_path), "noise_offset")
    cfg = ae_config()
    cfg["training"]["cache_latents"] = "yes"
    assert_error(train("--base", write(tmp_path / "k.yaml", cfg), "--logdir", tmp_path),
                 "training.cache_latents must be true or false")
    cfg = ae_config()
    cfg["training"]["snr_gamma"] = -1
    assert_error(train("--base", write(tmp_path / "l.yaml", cfg), "--logdir", tmp_path), "training.snr_gamma")
    cfg = ae_config()
    cfg["training"]["init_weights"] = str(tmp_path / "none.safetensors")
    assert_error(train("--base", write(tmp_path / "j.yaml", cfg), "--logdir", tmp_path), "init_weights not found")
    cfg = ldm_config(tmp_path / "no-autoencoder.safetensors")
    assert_error(train("--base", write(tmp_path / "h.yaml", cfg), "--logdir", tmp_path), "first-stage weights not found")


def test_unwritable_log_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = write(tmp_path / "ae.yaml", ae_config())
    assert_error(train("--base", cfg, "--logdir", blocker / "logs"), "not writable")


def test_lambda_linear_scheduler_matches_the_original_shape():
    s = LambdaLinearScheduler(warm_up_steps=[10], f_start=[1e-6], f_max=[1.0], f_min=[0.1], cycle_lengths=[110])
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(1e-6 + (1.0 - 1e-6) * 0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_ema_update_rule():
    from ldm.training.trainers import Ema

    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema([("w", p)], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([("w", p)])  # decay min(0.5, 2/11) = 2/11
    assert torch.allclose(ema.weights()["w"], torch.full((3,), 1 - 2 / 11))
    state = ema.state_dict("model_ema.")
    assert set(state) == {"model_ema.w", "model_ema.decay", "model_ema.num_updates"}


def test_cached_latents_equal_the_encoders_and_skip_it(trained):
    """``cache_latents``: the first sight of an item runs the encoder, later ones draw from its stored posterior;
    with the same random state the latents equal those of the uncached path (encode().sample())."""
    from torch.utils.data import default_collate

    from ldm.demo.shapes import ShapesDataset
    from ldm.training.trainers import LatentDiffusionTrainer
    from ldm.util import instantiate_from_config

    weights = trained / "logs/ae/weights/last.safetensors"
    model = instantiate_from_config(ldm_config(weights)["model"])
    cached = LatentDiffusionTrainer(model, 1e-3, first_stage_weights=str(weights), cache_latents=True)
    plain = LatentDiffusionTrainer(model, 1e-3, cache_latents=False)
    encoded_rows = []
    hook = model.first_stage_model.encoder.register_forward_hook(lambda m, i, o: encoded_rows.append(i[0].shape[0]))
    data = ShapesDataset(length=8, resolution=32, seed=3)
    batch = default_collate([data[i] for i in (5, 2, 7)])
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            first = cached.first_stage_latents(batch)
            torch.manual_seed(0)
            again = cached.first_stage_latents(batch)
            assert encoded_rows == [3]  # the second call ran no encoder
            torch.manual_seed(0)
            reference = plain.first_stage_latents(batch)
            assert encoded_rows == [3, 3]
            torch.manual_seed(1)
            fresh_noise = cached.first_stage_latents(batch)
            # a batch with one new item encodes that item only
            cached.first_stage_latents(default_collate([data[i] for i in (2, 0)]))
            assert encoded_rows == [3, 3, 1]
    finally:
        hook.remove()
    assert first.shape == (3, 4, 16, 16)
    # cached and uncached encodings computed here with the same seed: exact on one machine
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    assert not torch.equal(fresh_noise, first)  # a new latent is sampled every time, as without the cache


def test_min_snr_weights_give_min_snr_times_the_x0_error():
    """Min-SNR-gamma (Hang et al. 2023): whatever the network predicts (eps, v or x0), the weighted loss equals
    min(SNR, gamma) times the squared error of the x0 estimate that prediction implies."""
    from ldm.training.trainers import min_snr_weight

    torch.manual_seed(0)
    gamma = 5.0
    alpha_bar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.004], dtype=torch.float64)
    a, s = alpha_bar.sqrt().view(-1, 1), (1 - alpha_bar).sqrt().view(-1, 1)
    snr = alpha_bar / (1 - alpha_bar)
    x0, eps = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    x_t = a * x0 + s * eps
    eps_hat, v_hat = eps + 0.1 * torch.randn_like(eps), (a * eps - s * x0) + 0.1 * torch.randn_like(eps)
    x0_from = {"eps": (x_t - s * eps_hat) / a, "v": a * x_t - s * v_hat}
    losses = {"eps": (eps_hat - eps).pow(2).mean(1), "v": (v_hat - (a * eps - s * x0)).pow(2).mean(1)}
    for kind in ("eps", "v"):
        expected = torch.clamp(snr, max=gamma) * (x0_from[kind] - x0).pow(2).mean(1)
        torch.testing.assert_close(losses[kind] * min_snr_weight(snr, gamma, kind), expected)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    x0_loss = (x0_hat - x0).pow(2).mean(1)
    torch.testing.assert_close(x0_loss * min_snr_weight(snr, gamma, "x0"), torch.clamp(snr, max=gamma) * x0_loss)
    assert min_snr_weight(snr, gamma, "v")[0] < 0.01 and min_snr_weight(snr, gamma, "v")[-1] == pytest.approx(
        snr[-1] / (snr[-1] + 1))  # low noise weighted down, high noise as the plain v loss


def test_demo_recipe_configs_validate_and_chain():
    """Each documented run of the demo recipe passes the config checks, and each run reads the previous one's
    output (models/demo/README.md)."""
    from ldm.training.config import load_training_config

    demo = REPO / "configs/demo"
    runs = {
        "ae": [demo / "shapes-autoencoder.yaml"],
        "decoder": [demo / "shapes-autoencoder.yaml", demo / "shapes-autoencoder-decoder.yaml"],
        "ldm": [demo / "shapes-ldm.yaml"],
    }
    cfg = {name: load_training_config([str(p) for p in paths]) for name, paths in runs.items()}
    assert cfg["decoder"].training.init_weights == "logs/shapes-autoencoder/weights/last.safetensors"
    assert cfg["ldm"].training.first_stage_weights == "logs/shapes-autoencoder-decoder/weights/last.safetensors"
    assert cfg["ldm"].training.cache_latents is True and cfg["ldm"].data.params.batch_size == 64
    # one learning-rate cycle over the whole run
    steps = cfg["ldm"].lightning.trainer.max_steps
    assert cfg["ldm"].model.params.scheduler_config.params.cycle_lengths == [steps]
    assert sorted(p.name for p in demo.glob("*.yaml")) == sorted({p.name for paths in runs.values() for p in paths})
