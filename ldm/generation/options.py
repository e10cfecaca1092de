"""The options of a generation run: what the command line (or a caller) asks for, before defaults.

One dataclass serves every generation command; a field left None takes its default from :mod:`ldm.defaults`
when the run is planned (:func:`ldm.generation.plan.plan_run`), which also validates it. The run manifest
records the options with every default filled in, so ``sdgen replay`` runs the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from ldm.errors import SdgenError

#: Flag spellings of option fields, for messages.
FLAGS = {
    "grid": "--grid", "original_size": "--original-size", "crop_coords": "--crop-coords",
    "target_size": "--target-size", "aesthetic_score": "--aesthetic-score",
    "negative_aesthetic_score": "--negative-aesthetic-score", "steps": "--steps", "n_samples": "--n_samples",
    "n_iter": "--n_iter", "latent_channels": "--C", "factor": "--f", "height": "--H", "width": "--W",
}

#: The SDXL micro-conditioning / grid options, refused for other models.
SDXL_FIELDS = ("grid", "original_size", "crop_coords", "target_size", "aesthetic_score", "negative_aesthetic_score")


@dataclass(kw_only=True)
class GenerateOptions:
    """Everything a generation run is made from; None means "the default" (:mod:`ldm.defaults`).

    Attributes:
        command: txt2img, img2img, safe-txt2img, unclip-variate, sdxl-refine, inpaint, depth2img or upscale.
        prompt, negative_prompt: the prompt (None: the command's default) and the unconditional one.
        from_file: a prompt file (:mod:`ldm.generation.prompt_file`: .txt one prompt per line, .csv / .jsonl with
            per-line settings); ``prompt_list`` / ``prompt_entries`` (set by ``sdgen replay``) replace reading it.
            ``tags``: extra .csv columns carried to the manifest as each image's metadata; ``i2p_settings``: "row"
            (an I2P file's own scale and size) or "fixed" (the command's).
        config, ckpt: model config and checkpoint (None: the original scripts' paths, or the demo model);
            ``refiner_ckpt`` / ``refiner_config`` the SDXL refiner of ``sdxl-refine``.
        init_img: img2img / SDEdit input image, or unCLIP's image or folder of images; the image to inpaint,
            to take the depth of, or to upscale.
        mask: ``inpaint``: the mask image (greyscale >= 0.5, i.e. 8-bit >= 128, is repainted); ``depth_map``:
            ``depth2img``: a depth image (larger = nearer) instead of MiDaS's; ``tile``: ``upscale`` in overlapping
            latent tiles with a tiled VAE decode (bounded memory).
        strength: img2img / SDEdit strength; ``high_noise_frac`` the base's share in a base -> refiner run.
        sampler, steps, scale, eta, height, width, n_samples, n_iter, seed: as the original scripts' flags.
        schedule: A1111's "Schedule type": default (the sampler's own grid), karras, exponential, sgm_uniform.
        grid, original_size, crop_coords, target_size, aesthetic_score, negative_aesthetic_score: SDXL only
            (sizes as "H,W" / "TOP,LEFT" strings).
        s_churn, s_tmin, s_tmax, s_noise: Euler / Heun churn.
        noise_level, clip_stats, embedder_ckpt: unCLIP.
        prior, prior_config, prior_clip, prior_steps, prior_scale: ``txt2img`` with an unCLIP-L checkpoint: the Karlo
            prior's file and config, a CLIP text tower for it when the checkpoint lacks one, its steps and guidance
            scale (:mod:`ldm.models.prior`).
        sld: Safe Latent Diffusion settings (:func:`ldm.sld_config.options_record`), None for plain CFG.
        prompt_syntax: "a1111" (weights, BREAK, long prompts, LoRA tags) or "original" (the scripts' text, cut at
            77 tokens); ``clip_skip`` A1111's clip skip (1: the encoders' usual layer).
        lora, lora_dir: ``PATH[:WEIGHT]`` LoRA files, and the folder ``<lora:NAME:WEIGHT>`` tags are looked up in
            (None: models/lora); ``embedding``, ``embeddings_dir`` textual-inversion files and the folder whose
            embeddings are all available (None: models/embeddings); ``vae`` a replacement VAE file
            (:mod:`ldm.adapters.adapter_set`).
        sweep: ``FIELD=V1,V2,...`` axes of an X/Y plot (:mod:`ldm.generation.jobs`).
        resume: write only the images of the latest run in ``outdir`` that are missing.
        devices, num_nodes, accelerator, dist_timeout: processes per machine, machines, the device kind, and how
            long (s) processes wait for each other to connect (:mod:`ldm.generation.distributed`).
        threads: CPU threads per process (None: the cores shared out over the machine's processes).
        safety_checker / no_safety_checker / watermark: output safety; precision / device: where and how.
        engine: how the networks execute: "torch" or "openvino" (:mod:`ldm.engines`).
        compile: ``torch.compile`` the UNet; vae_tiling: decode in overlapping tiles (bounded memory for large
            images) (:mod:`ldm.generation.inference`); offload: CUDA, weights in host memory, each part on the
            GPU only while it runs (:mod:`ldm.generation.offload`); low_memory: ``sdxl-refine`` keeps one of base and refiner
            in memory at a time (:func:`ldm.generation.generate.generate_model_by_model`).
    """

    command: str
    prompt: Optional[str] = None
    negative_prompt: str = ""
    from_file: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    i2p_settings: str = "row"
    prompt_list: Optional[list[str]] = field(default=None)
    outdir: Optional[str] = None
    skip_grid: bool = False
    skip_save: bool = False
    n_rows: int = 0
    config: Optional[str] = None
    ckpt: Optional[str] = None
    refiner_ckpt: Optional[str] = None
    refiner_config: Optional[str] = None
    init_img: Optional[str] = None
    mask: Optional[str] = None
    depth_map: Optional[str] = None
    tile: bool = False
    strength: Optional[float] = None
    high_noise_frac: Optional[float] = None
    sampler: Optional[str] = None
    schedule: str = "default"
    steps: Optional[int] = None
    scale: Optional[float] = None
    eta: float = 0.0
    height: Optional[int] = None
    width: Optional[int] = None
    latent_channels: int = 4
    factor: Optional[int] = None
    n_samples: Optional[int] = None
    n_iter: Optional[int] = None
    seed: Optional[int] = None
    fixed_code: bool = False
    grid: Optional[str] = None
    original_size: Optional[str] = None
    crop_coords: Optional[str] = None
    target_size: Optional[str] = None
    aesthetic_score: Optional[float] = None
    negative_aesthetic_score: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmin: Optional[float] = None
    s_tmax: Optional[float] = None
    s_noise: Optional[float] = None
    noise_level: Optional[int] = None
    clip_stats: Optional[str] = None
    embedder_ckpt: Optional[str] = None
    prior: Optional[str] = None
    prior_config: Optional[str] = None
    prior_clip: Optional[str] = None
    prior_steps: Optional[int] = None
    prior_scale: Optional[float] = None
    sld: Optional[dict[str, Any]] = None
    prompt_syntax: str = "a1111"
    clip_skip: int = 1
    lora: list[str] = field(default_factory=list)
    lora_dir: Optional[str] = None
    embedding: list[str] = field(default_factory=list)
    embeddings_dir: Optional[str] = None
    vae: Optional[str] = None
    sweep: list[str] = field(default_factory=list)
    prompt_entries: Optional[list[dict[str, Any]]] = None
    resume: bool = False
    precision: str = "autocast"
    device: str = "auto"
    engine: str = "torch"
    compile: bool = False
    vae_tiling: bool = False
    offload: bool = False
    low_memory: bool = False
    devices: Optional[int] = None
    threads: Optional[int] = None
    num_nodes: int = 1
    accelerator: str = "auto"
    dist_timeout: float = 300.0
    safety_checker: Optional[str] = None
    no_safety_checker: bool = False
    watermark: bool = True

    @property
    def per_image_prompts(self) -> bool:
        """Whether each prompt is one image per iteration (a prompt file or a replayed list) rather than one
        prompt for the whole batch."""
        return self.from_file is not None or self.prompt_list is not None or self.prompt_entries is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **changes: Any) -> "GenerateOptions":
        """Options from a manifest's ``options`` (keys of other versions ignored), with ``changes`` applied."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(record).items() if k in known}
        values.update(changes)
        if "command" not in values:
            raise SdgenError("the recorded options name no command")
        return cls(**values)


def parse_pair(flag: str, value: Optional[str]) -> Optional[tuple[int, int]]:
    """``"1024,768"`` -> (1024, 768): two non-negative integers, height (or top) first as in SGM."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).replace(" ", ",").split(",") if p.strip()]
    try:
        pair = tuple(int(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise SdgenError(f"{flag} takes two non-negative integers HEIGHT,WIDTH (or TOP,LEFT), got {value!r}")
    return pair  # type: ignore[return-value]
