"""The training config: the original sections (``model``, ``data``, ``lightning.trainer``) plus sdgen's
``training`` section, checked field by field before anything is built, and the Lightning module and data module
it describes.

``training`` keys: ``checkpoint_every_n_steps``, ``ema_decay``, ``first_stage_weights``, ``crop_size``, ``seed``,
``num_threads``, ``noise_offset``, ``cache_latents`` (keep the frozen encoder's posteriors of the data set in
memory), ``snr_gamma`` (Min-SNR loss weights); for the autoencoder ``init_weights`` and ``freeze_encoder``, which
fine-tune the decoder of trained weights, as the SD ft-MSE VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.errors import SdgenError

TRAINING_KEYS = {"checkpoint_every_n_steps", "ema_decay", "first_stage_weights", "crop_size", "seed", "num_threads",
                 "init_weights", "freeze_encoder", "noise_offset", "cache_latents", "snr_gamma"}


# Integer / number / integer-list fields of the model configs sdgen trains, checked before anything is built.
INT_FIELDS = frozenset({
    "embed_dim", "ch", "z_channels", "resolution", "in_channels", "out_ch", "num_res_blocks", "model_channels",
    "image_size", "out_channels", "context_dim", "num_head_channels", "num_heads", "transformer_depth", "timesteps",
    "channels", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "vocab_size", "projection_dim", "max_length", "batch_size", "num_workers", "length",
    "seed", "warm_up_steps", "cycle_lengths",
})
NUMBER_FIELDS = frozenset({"linear_start", "linear_end", "kl_weight", "logvar_init", "dropout", "scale_factor",
                           "l_simple_weight", "original_elbo_weight", "p_drop_size", "p_drop_background",
                           "p_empty_caption", "f_min", "f_max", "f_start"})
INT_LIST_FIELDS = frozenset({"ch_mult", "channel_mult", "attention_resolutions", "attn_resolutions"})


def check_field_types(node: Any, where: str) -> None:
    """Walk a config section and check the types of the known numeric fields (raises SdgenError)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            listy = isinstance(value, list)
            if key in INT_FIELDS and not (_is_int(value) or (listy and all(_is_int(v) for v in value))):
                raise SdgenError(f"config: {path} must be an integer, got {value!r}")
            if key in NUMBER_FIELDS and not (_is_num(value) or (listy and all(_is_num(v) for v in value))):
                raise SdgenError(f"config: {path} must be a number, got {value!r}")
            if key in INT_LIST_FIELDS and not (listy and all(_is_int(v) for v in value)):
                raise SdgenError(f"config: {path} must be a list of integers, got {value!r}")
            check_field_types(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_field_types(value, f"{where}[{i}]")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(section: str, name: str, value: Any, kind: type | tuple[type, ...], *, positive: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind) or (positive and value <= 0):
        want = "a positive number" if positive else "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SdgenError(f"config: {section}.{name} must be {want}, got {value!r}")
    return value


def load_training_config(paths: list[str]) -> Any:
    """Merge the ``--base`` configs (later ones win, as in CV main.py) and check the fields sdgen reads."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_config

    if not paths:
        raise SdgenError("pass a training config with --base CONFIG.yaml")
    cfg = OmegaConf.merge(*[load_config(p) for p in paths])
    for section in ("model", "data"):
        node = cfg.get(section)
        if node is None or not OmegaConf.is_dict(node) or not isinstance(node.get("target"), str):
            raise SdgenError(f"config: section {section!r} with a 'target' string is required")
        if node.get("params") is not None and not OmegaConf.is_dict(node.params):
            raise SdgenError(f"config: {section}.params must be a mapping")
    _typed("model", "base_learning_rate", cfg.model.get("base_learning_rate"), (int, float), positive=True)
    training = cfg.get("training") or {}
    if not OmegaConf.is_dict(training) and not isinstance(training, dict):
        raise SdgenError("config: training must be a mapping")
    unknown = sorted(set(training) - TRAINING_KEYS)
    if unknown:
        raise SdgenError(f"config: unknown training key(s) {', '.join(unknown)} (known: {', '.join(sorted(TRAINING_KEYS))})")
    for key in ("checkpoint_every_n_steps", "crop_size", "num_threads"):
        if training.get(key) is not None:
            _typed("training", key, training[key], int, positive=True)
    if training.get("seed") is not None:
        _typed("training", "seed", training["seed"], int)
    if training.get("ema_decay") is not None:
        decay = _typed("training", "ema_decay", training["ema_decay"], float)
        if not 0.0 < decay < 1.0:
            raise SdgenError(f"config: training.ema_decay must be in (0, 1), got {decay!r}")
    for key in ("first_stage_weights", "init_weights"):
        if training.get(key) is not None:
            _typed("training", key, training[key], str)
    if training.get("snr_gamma") is not None:
        _typed("training", "snr_gamma", training["snr_gamma"], (int, float), positive=True)
    if training.get("noise_offset") is not None:
        offset = _typed("training", "noise_offset", training["noise_offset"], (int, float))
        if offset < 0:
            raise SdgenError(f"config: training.noise_offset must be >= 0, got {offset!r}")
    for key in ("freeze_encoder", "cache_latents"):
        if training.get(key) is not None and not isinstance(training[key], bool):
            raise SdgenError(f"config: training.{key} must be true or false, got {training[key]!r}")
    for section in ("model", "data"):
        check_field_types(OmegaConf.to_container(cfg[section], resolve=True), section)
    trainer = (cfg.get("lightning") or {}).get("trainer") or {}
    if not OmegaConf.is_dict(trainer) and not isinstance(trainer, dict):
        raise SdgenError("config: lightning.trainer must be a mapping of Trainer arguments")
    if trainer.get("max_steps") is not None:
        _typed("lightning.trainer", "max_steps", trainer["max_steps"], int, positive=True)
    return cfg


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SdgenError(f"log folder {path} is not writable ({exc.strerror or exc})") from exc
    return path


def _resolve_repo_path(value: str) -> str:
    from ldm.model_files import find_file

    return str(find_file(value))


def build_module(cfg: Any) -> Any:
    """The LightningModule for ``cfg.model``: autoencoder or latent diffusion (raises SdgenError)."""
    from omegaconf import OmegaConf

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.training.trainers import AutoencoderTrainer, LatentDiffusionTrainer
    from ldm.util import get_obj_from_str, instantiate_from_config

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    training = OmegaConf.to_container(cfg.get("training") or OmegaConf.create({}), resolve=True)
    lr = float(model_cfg.pop("base_learning_rate"))
    cls = get_obj_from_str(model_cfg["target"])
    try:
        model = instantiate_from_config(model_cfg)
    except SdgenError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SdgenError(f"config: model ({model_cfg['target']}) could not be built: {exc}") from exc
    params = model_cfg.get("params") or {}
    if isinstance(model, AutoencoderKL) or (isinstance(cls, type) and issubclass(cls, AutoencoderKL)):
        init = training.get("init_weights")
        return AutoencoderTrainer(model, lr, lossconfig=params.get("lossconfig"),
                                  scheduler_config=params.get("scheduler_config"),
                                  ema_decay=training.get("ema_decay"), crop_size=training.get("crop_size"),
                                  init_weights=_resolve_repo_path(init) if init else None,
                                  freeze_encoder=bool(training.get("freeze_encoder", False)))
    if isinstance(model, LatentDiffusion):
        weights = training.get("first_stage_weights")
        return LatentDiffusionTrainer(model, lr, _resolve_repo_path(weights) if weights else None,
                                      ema_decay=training.get("ema_decay"),
                                      noise_offset=float(training.get("noise_offset", 0.0)),
                                      init_weights=_resolve_repo_path(training["init_weights"])
                                      if training.get("init_weights") else None,
                                      cache_latents=bool(training.get("cache_latents", False)),
                                      snr_gamma=training.get("snr_gamma"))
    raise SdgenError(f"config: sdgen trains AutoencoderKL and LatentDiffusion models, not {model_cfg['target']}")


def build_data(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        data = instantiate_from_config(data_cfg)
    except SdgenError:
        raise
    except (TypeError, ValueError) as exc:
        raise SdgenError(f"config: data ({data_cfg['target']}) could not be built: {exc}") from exc
    if not callable(getattr(data, "train_dataloader", None)):
        raise SdgenError(f"config: data target {data_cfg['target']} has no train_dataloader()")
    return data


def check_resume(module: Any, ckpt_path: Path) -> None:
    """Refuse a resume checkpoint whose weights do not fit the config's model (names the first differences)."""
    import torch

    from ldm.training.trainers import EMA_PREFIX

    if not ckpt_path.is_file():
        raise SdgenError(f"resume checkpoint not found: {ckpt_path}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        state = ckpt["state_dict"]
    except Exception as exc:  # any unreadable file is a user error here
        raise SdgenError(f"resume checkpoint {ckpt_path} is not a training checkpoint ({exc})") from exc
    expected = module.expected_checkpoint_shapes()
    found = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shape = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with other shapes (e.g. {k}: {found[k]} vs {expected[k]})")
        raise SdgenError(f"resume checkpoint {ckpt_path} does not match the config's model: {'; '.join(parts)}")
