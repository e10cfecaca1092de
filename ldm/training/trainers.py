"""Training: Lightning wrappers around the inference models (CV ``main.py`` + the training half of ``ddpm.py``).

The inference classes (:class:`ldm.models.autoencoder.AutoencoderKL`,
:class:`ldm.models.diffusion.ddpm.LatentDiffusion`) stay plain ``nn.Module`` objects; this module, imported only
by ``sdgen train``, adds what the original LightningModules had: the losses, the EMA of the weights,
``configure_optimizers`` with the config's learning-rate schedule, and checkpoints in the released key layout.

Checkpoint layout: the wrapper holds the inference model as ``self.model``; :meth:`on_save_checkpoint` strips that
prefix, so a saved ``state_dict`` reads ``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``, schedule buffers (and ``model_ema.*`` as in the released SD 1.x
files), or ``encoder.*`` / ``decoder.*`` / ``quant_conv.*`` / ``post_quant_conv.*`` for the autoencoder.
``sdgen txt2img --ckpt`` loads such a checkpoint directly; :func:`export_weights` writes the EMA weights alone
as ``.safetensors``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.errors import SdgenError
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

WRAPPER_PREFIX = "model."
EMA_PREFIX = "model_ema."


# ----------------------------------------------------------------------------- EMA


class Ema:
    """Exponential moving average of a module's trainable parameters (CV ``ldm/modules/ema.py`` ``LitEma``).

    ``decay`` is warmed up as ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far, as in LitEma.
    State keys follow LitEma's buffer names (the parameter name without dots), e.g. ``model_ema.diffusion_modelout0weight``.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise SdgenError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in named_parameters if p.requires_grad}

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in named_parameters:
            if name in self.shadow:
                shadow = self.shadow[name]
                if shadow.device != p.device:
                    shadow = self.shadow[name] = shadow.to(p.device)
                shadow.lerp_(p.detach().float(), 1.0 - decay)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + name.replace(".", ""): t.detach().cpu().clone() for name, t in self.shadow.items()}
        out[prefix + "decay"] = torch.tensor(self.decay)
        out[prefix + "num_updates"] = torch.tensor(self.num_updates, dtype=torch.int32)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        for name in self.shadow:
            key = prefix + name.replace(".", "")
            if key not in state:
                raise SdgenError(f"checkpoint has no EMA entry {key}")
            self.shadow[name] = state[key].detach().float().clone()
        if prefix + "num_updates" in state:
            self.num_updates = int(state[prefix + "num_updates"])

    def weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> averaged value."""
        return dict(self.shadow)


# ----------------------------------------------------------------------------- losses


class ReconstructionKLLoss(nn.Module):
    """The reconstruction + KL terms of the original ``LPIPSWithDiscriminator`` (CV ``ldm/modules/losses``).

    ``nll = sum(|x - x_rec| / exp(logvar) + logvar) / B`` with a learned scalar ``logvar``, plus
    ``kl_weight * sum(KL(q(z|x) || N(0, I))) / B``. The perceptual (LPIPS, needs VGG weights) and adversarial
    terms are not available offline: their weights must be 0 (or absent).
    """

    def __init__(self, kl_weight: float = 1.0e-6, logvar_init: float = 0.0, rec_loss: str = "l1",
                 perceptual_weight: float = 0.0, disc_weight: float = 0.0, **_ignored: Any) -> None:
        super().__init__()
        if perceptual_weight or disc_weight:
            raise SdgenError("lossconfig: perceptual_weight and disc_weight must be 0 (LPIPS and the "
                             "discriminator need downloaded weights; sdgen trains the reconstruction + KL terms)")
        if rec_loss not in ("l1", "l2"):
            raise SdgenError(f"lossconfig: rec_loss must be 'l1' or 'l2', not {rec_loss!r}")
        self.kl_weight = float(kl_weight)
        self.rec_loss = rec_loss
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))

    def forward(self, x: torch.Tensor, rec: torch.Tensor, posterior: Any) -> dict[str, torch.Tensor]:
        diff = rec - x
        rec_loss = diff.abs() if self.rec_loss == "l1" else diff.pow(2)
        b = x.shape[0]
        nll = (rec_loss / torch.exp(self.logvar) + self.logvar).sum() / b
        kl = posterior.kl().sum() / b
        return {"loss": nll + self.kl_weight * kl, "rec_loss": rec_loss.mean().detach(),
                "kl_loss": kl.detach(), "nll_loss": nll.detach(), "logvar": self.logvar.detach()}


# ----------------------------------------------------------------------------- shared base


def batch_images(batch: Mapping[str, Any], key: str = "image") -> torch.Tensor:
    """``batch[key]`` (B, H, W, 3) in [-1, 1] (the original ldm data convention) -> (B, 3, H, W) float32."""
    x = batch[key]
    if x.ndim != 4:
        raise SdgenError(f"batch[{key!r}] must be (B, H, W, C), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous().float()


class _TrainerBase(pl.LightningModule):
    """Holds ``self.model`` (the inference module), the EMA, optimizer + schedule and the checkpoint layout."""

    def __init__(self, model: nn.Module, learning_rate: float, scheduler_config: Mapping[str, Any] | None,
                 ema_decay: float | None) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = float(learning_rate)
        self.scheduler_config = scheduler_config
        self.ema_decay = ema_decay
        self.ema: Ema | None = None

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The inference model's trainable parameters (names without the wrapper prefix)."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        if self.ema_decay is not None and self.ema is None:
            self.ema = Ema(self.trainable_named_parameters(), self.ema_decay)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        # the EMA follows every optimizer step (before any checkpoint callback of that batch runs)
        out = super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.trainable_named_parameters())
        return out

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def configure_optimizers(self) -> Any:
        params = [p for _, p in self.trainable_named_parameters()] + self.extra_parameters()
        opt = torch.optim.AdamW(params, lr=self.learning_rate)
        if not self.scheduler_config:
            return opt
        schedule = instantiate_from_config(self.scheduler_config)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ---- checkpoint layout ----

    def inference_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The inference model's state_dict (released key layout), with the EMA weights when available."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if use_ema and self.ema is not None:
            for name, value in self.ema.weights().items():
                sd[name] = value.to(sd[name].dtype).cpu()
        return sd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        out = {}
        for key, value in state.items():
            out[key[len(WRAPPER_PREFIX):] if key.startswith(WRAPPER_PREFIX) else "training." + key] = value
        if self.ema is not None:
            out.update(self.ema.state_dict(EMA_PREFIX))
        checkpoint["state_dict"] = out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.ema_decay is not None:
            if self.ema is None:
                self.ema = Ema(self.trainable_named_parameters(), self.ema_decay)
            self.ema.load_state_dict(state, EMA_PREFIX)
        checkpoint["state_dict"] = {
            (key[len("training."):] if key.startswith("training.") else WRAPPER_PREFIX + key): value
            for key, value in state.items() if not key.startswith(EMA_PREFIX)
        }

    def expected_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape a resume checkpoint's ``state_dict`` must have (released layout, without EMA entries)."""
        out = {}
        for key, value in self.state_dict().items():
            name = key[len(WRAPPER_PREFIX):] if key.startswith(WRAPPER_PREFIX) else "training." + key
            out[name] = tuple(value.shape)
        return out


# ----------------------------------------------------------------------------- autoencoder


class AutoencoderTrainer(_TrainerBase):
    """Trains an :class:`AutoencoderKL` with :class:`ReconstructionKLLoss` (Adam as in CV, one optimizer: no
    discriminator). ``crop_size`` trains on random square crops (the network is convolutional).

    ``init_weights`` starts from trained weights; with ``freeze_encoder`` only the decoder side
    (``post_quant_conv``, ``decoder``) learns, so the latent space (and any LDM trained on it) stays valid while
    the reconstructions improve (what Stability did for the SD ft-MSE VAE decoder)."""

    def __init__(self, model: nn.Module, learning_rate: float, lossconfig: Mapping[str, Any] | None = None,
                 scheduler_config: Mapping[str, Any] | None = None, ema_decay: float | None = None,
                 crop_size: int | None = None, image_key: str = "image", init_weights: str | None = None,
                 freeze_encoder: bool = False) -> None:
        if init_weights is not None:
            load_autoencoder_weights(model, init_weights)
        if freeze_encoder:
            for part in (model.encoder, model.quant_conv):
                for p in part.parameters():
                    p.requires_grad_(False)
        super().__init__(model, learning_rate, scheduler_config, ema_decay)
        params = dict((lossconfig or {}).get("params", {}) or {})
        self.loss = ReconstructionKLLoss(**params)
        self.crop_size = crop_size
        self.image_key = image_key

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.loss.logvar]

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop_size
        if not c or c >= x.shape[-1]:
            return x
        i, j = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,)))
        return x[..., i:i + c, j:j + c]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x = self._crop(batch_images(batch, self.image_key))
        rec, posterior = self.model(x)
        losses = self.loss(x, rec, posterior)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, on_step=True)
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, on_step=True)
        return losses["loss"]


# ----------------------------------------------------------------------------- latent diffusion


class LatentDiffusionTrainer(_TrainerBase):
    """Trains a :class:`LatentDiffusion`: the UNet (and the text encoder when ``cond_stage_trainable``) with the
    original ``p_losses`` (CV ddpm.py): ``l_simple_weight * mean(loss_simple / exp(logvar_t) + logvar_t)
    + original_elbo_weight * mean(lvlb_weights[t] * loss_simple)``, ``loss_simple`` the per-image MSE (or L1)
    between the network output and its eps / v / x0 target. The first stage is frozen and loaded from
    ``first_stage_weights``; with ``scale_by_std`` the latent scale becomes 1/std of the first batch's latents.
    ``noise_offset`` > 0 trains with offset noise (flat-colored images need it: see :meth:`p_losses`).
    ``snr_gamma`` > 0 weights each image's loss with Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556), which
    caps the weight of the low-noise steps: :func:`min_snr_weight`. Unset, the loss is the original one.

    ``cache_latents`` keeps the frozen encoder's posterior (mean and log-variance, (2C, h, w) float32 per item)
    of every data set item it has seen, keyed by the batch's ``index`` entry, and draws a fresh latent from it
    each time (as the original's ``encode().sample()`` does): after the first epoch the encoder no longer runs.
    It needs a data set whose items are the same on every epoch (such as :class:`ldm.demo.shapes.ShapesDataset`)
    and ``4 * 2C * h * w`` bytes per item (8 KiB for 16x16x4 latents).
    """

    def __init__(self, model: LatentDiffusion, learning_rate: float, first_stage_weights: str | None = None,
                 ema_decay: float | None = None, noise_offset: float = 0.0, init_weights: str | None = None,
                 cache_latents: bool = False, snr_gamma: float | None = None) -> None:
        tp = model.training_params
        super().__init__(model, learning_rate, tp.get("scheduler_config"), ema_decay)
        self.loss_type = tp.get("loss_type", "l2")
        if self.loss_type not in ("l1", "l2"):
            raise SdgenError(f"loss_type must be 'l1' or 'l2', not {self.loss_type!r}")
        self.l_simple_weight = float(tp.get("l_simple_weight", 1.0))
        self.original_elbo_weight = float(tp.get("original_elbo_weight", 0.0))
        self.first_stage_key = tp.get("first_stage_key", "image")
        self.cond_stage_key = tp.get("cond_stage_key", "caption")
        self.scale_by_std = bool(tp.get("scale_by_std", False))
        self.noise_offset = float(noise_offset)
        self._scale_set = False
        self.cache_latents = bool(cache_latents)
        if snr_gamma is not None and not snr_gamma > 0:
            raise SdgenError(f"snr_gamma must be positive, got {snr_gamma!r}")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        self._posterior_cache: dict[int, torch.Tensor] = {}
        if init_weights is not None:  # continue from a trained model (fresh optimizer, schedule and EMA)
            load_model_weights(model, init_weights)
            self._scale_set = True
        elif first_stage_weights is not None:
            load_first_stage(model, first_stage_weights)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # CV ddpm.py: rescale the latents to unit standard deviation from the first batch of a fresh run
        if self.scale_by_std and not self._scale_set and self.global_step == 0 and batch_idx == 0:
            with torch.no_grad():
                x = batch_images(batch, self.first_stage_key).to(self.device)
                z = self.model.first_stage_model.encode(x).sample()
                self.model.scale_factor.fill_(1.0 / z.flatten().std())
            logger.info("scale_factor set to %.5f (1/std of the first batch's latents)", float(self.model.scale_factor))
        self._scale_set = True

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        m = self.model
        z = self.first_stage_latents(batch)
        captions = list(batch[self.cond_stage_key])
        if m.cond_stage_trainable:
            c = m.get_learned_conditioning(captions)
        else:
            with torch.no_grad():
                c = m.get_learned_conditioning(captions)
        t = torch.randint(0, m.num_timesteps, (z.shape[0],), device=z.device).long()
        loss, logs = self.p_losses(z, c, t)
        self.log_dict(logs, prog_bar=False, on_step=True)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True)
        return loss

    @torch.no_grad()
    def first_stage_latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Scaled latents ``scale_factor * z`` (B, C, h, w) of the batch's images, ``z`` sampled from the frozen
        encoder's posterior (computed, or taken from the cache with ``cache_latents``)."""
        from ldm.modules.distributions import DiagonalGaussianDistribution

        m = self.model
        if not self.cache_latents or "index" not in batch:
            x = batch_images(batch, self.first_stage_key)
            return m.get_first_stage_encoding(m.encode_first_stage(x)).detach()
        keys = [int(i) for i in batch["index"]]
        missing = [row for row, key in enumerate(keys) if key not in self._posterior_cache]
        if missing:
            x = batch_images(batch, self.first_stage_key)[missing]
            moments = m.encode_first_stage(x.to(self.device)).parameters.float().cpu()
            for row, params in zip(missing, moments):
                self._posterior_cache[keys[row]] = params.clone()
        moments = torch.stack([self._posterior_cache[key] for key in keys]).to(self.device)
        return m.get_first_stage_encoding(DiagonalGaussianDistribution(moments)).detach()

    def p_losses(self, x0: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The original training objective for latents x0 (B,C,h,w), context c, integer steps t (B,)."""
        m = self.model
        noise = torch.randn_like(x0)
        if self.noise_offset:
            # offset noise (Guttenberg 2023): a per-image, per-channel constant added to the noise, so that the
            # model learns to set the mean color instead of reading it from the schedule's leftover signal at t~T
            noise = noise + self.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device)
        a = m.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = m.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a * x0 + s * noise
        out = m.apply_model(x_t, t, {"crossattn": c})
        if m.parameterization == "eps":
            target = noise
        elif m.parameterization == "v":
            target = a * noise - s * x0
        else:
            target = x0
        err = (out - target).abs() if self.loss_type == "l1" else (out - target).pow(2)
        loss_simple = err.mean(dim=(1, 2, 3))
        weighted = loss_simple
        if self.snr_gamma is not None:
            snr = m.alphas_cumprod[t] / (1.0 - m.alphas_cumprod[t])
            weighted = loss_simple * min_snr_weight(snr, self.snr_gamma, m.parameterization)
        logvar_t = m.logvar.to(x0.device)[t]
        loss = self.l_simple_weight * (weighted / torch.exp(logvar_t) + logvar_t).mean()
        loss_vlb = (m.lvlb_weights[t] * loss_simple).mean()
        loss = loss + self.original_elbo_weight * loss_vlb
        return loss, {"train/loss_simple": loss_simple.mean().detach(), "train/loss_vlb": loss_vlb.detach()}


def min_snr_weight(snr: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556) for per-image losses of an eps / v / x0
    network at signal-to-noise ratios ``snr = alpha_bar / (1 - alpha_bar)`` (B,).

    The x0 loss is weighted by ``min(snr, gamma)``; an eps loss equals ``snr`` times the x0 loss and a v loss
    ``snr + 1`` times, so their weights are ``min(snr, gamma) / snr`` and ``min(snr, gamma) / (snr + 1)``."""
    clipped = torch.clamp(snr, max=gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "v":
        return clipped / (snr + 1.0)
    return clipped


# ----------------------------------------------------------------------------- weights I/O


def load_autoencoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load exported autoencoder weights (keys ``encoder.*``, ...) into an AutoencoderKL (raises SdgenError)."""
    from ldm.checkpoint_reader import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"autoencoder init_weights not found: {path}")
    sd = {k: v.float() for k, v in read_state_dict(path).items() if not k.startswith((EMA_PREFIX, "training."))}
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(sd)) or [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise SdgenError(f"init_weights {path} do not match the autoencoder config (e.g. {', '.join(bad[:3])})")
    model.load_state_dict(sd)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole model's weights (released layout: an exported ``.safetensors`` or a training ``.ckpt``)."""
    from ldm.checkpoint_reader import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"init_weights not found: {path}")
    sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith((EMA_PREFIX, "training."))}
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(sd)) or [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise SdgenError(f"init_weights {path} do not match the model config (e.g. {', '.join(bad[:3])})")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()})


def load_first_stage(model: LatentDiffusion, path: str | Path) -> None:
    """Load trained autoencoder weights (an exported ``.safetensors`` / a training ``.ckpt``, keys ``encoder.*``...
    or ``first_stage_model.*``) into ``model.first_stage_model``."""
    from ldm.checkpoint_reader import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"first-stage weights not found: {path} (train the autoencoder first: "
                         "sdgen train --base configs/demo/shapes-autoencoder.yaml)")
    sd = read_state_dict(path)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith((EMA_PREFIX, "training."))}
    expected = model.first_stage_model.state_dict()
    bad = sorted(set(expected) ^ set(sd)) or [k for k in expected if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise SdgenError(f"first-stage weights {path} do not match first_stage_config (e.g. {', '.join(bad[:3])})")
    model.first_stage_model.load_state_dict({k: v.float() for k, v in sd.items()})


def export_weights(module: _TrainerBase, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the inference model's weights (EMA when kept) to ``path`` (.safetensors, released key layout).

    ``dtype`` (e.g. float16) converts floating tensors except the float32-only buffers (schedules, scale)."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = module.inference_state_dict()
    keep = set(getattr(module.model, "keep_fp32_buffers", ()))
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() and k not in keep else v) for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


class ExportWeights(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), export ``step-NNNNNN.safetensors`` and
    ``last.safetensors`` to ``dirpath`` (EMA weights, released layout: loadable by ``sdgen txt2img --ckpt``)."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)

    def _export(self, trainer: pl.Trainer, module: _TrainerBase) -> None:
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        export_weights(module, self.dirpath / f"step-{step:06d}.safetensors")
        export_weights(module, self.dirpath / "last.safetensors")
        logger.info("exported weights at step %d to %s", step, self.dirpath)

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._export(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        self._export(trainer, module)
