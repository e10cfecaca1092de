"""Generation as a library: one loop for txt2img and img2img.

    request (GenerationRequest) -> per batch: conditioner -> Denoiser -> CFGDenoiser -> sampler -> decode

:func:`generate` yields each image as soon as its batch is decoded, so a caller that writes images as they
come keeps every finished one when the run is interrupted. Randomness is explicit: image i of a run draws
its initial noise, its VAE posterior sample (img2img) and every ancestral step from its own CPU generator
seeded ``seed + i`` (:mod:`ldm.sampling.noise`), so it regenerates alone, in any batch, on any device.

The model is anything with the LatentDiffusion interface: ``get_learned_conditioning(list[str])``,
``apply_model(x, t, cond)``, ``encode_first_stage`` / ``get_first_stage_encoding`` / ``decode_first_stage``,
``alphas_cumprod`` and ``parameterization``. A conditioner turns a batch's jobs into the guider's
``{"cond": ..., "uncond": ...}`` network inputs (:class:`TextConditioner` for text; unCLIP adds its image
embedding in :class:`ldm.models.diffusion.unclip.ImageVariationConditioning`); SDXL's multi-stage loop
(:mod:`ldm.sdxl_pipeline`) shares the decode, safety-checker and init-image steps defined here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from ldm.bundled import bundled_path
from ldm.errors import SdgenError
from ldm.sampling import noise as noise_lib
from ldm.sampling import schedules
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.samplers import DEFAULT_GRID, SAMPLERS, default_time_mode, final_latent, initial_x, sampler_sigmas

if TYPE_CHECKING:
    import PIL.Image

logger = logging.getLogger(__name__)

# Where the CompVis scripts expect their inputs (CV scripts/txt2img.py defaults)
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
# The bundled demo model, used when no checkpoint is given and none is at DEFAULT_CKPT (models/demo/README.md)
DEMO_CONFIG = "configs/demo/shapes-ldm.yaml"
DEMO_CKPT = "models/demo/shapes-ldm.safetensors"

PRECISIONS = ("autocast", "full", "bf16", "fp16")


# ----------------------------------------------------------------------------- model files


@dataclass(frozen=True)
class ModelFiles:
    """The config and checkpoint a run loads (absolute paths)."""

    config: Path
    checkpoint: Path


def _find(path: str) -> Path:
    """``path`` as given, else among the bundled files (:mod:`ldm.bundled`; the originals run from the repo root)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate.resolve()
    bundled = bundled_path(str(candidate))
    return (bundled if bundled.exists() else candidate).resolve()


def resolve_checkpoint(ckpt: Optional[str], config: Optional[str]) -> ModelFiles:
    """Decide which checkpoint and config a run uses (the one place that decision lives).

    ``None`` means "not given": the original scripts' paths (:data:`DEFAULT_CKPT`, :data:`DEFAULT_CONFIG`).
    Relative paths are tried in the working directory, then in the sdgen source tree. When neither ``--ckpt``
    nor a checkpoint at :data:`DEFAULT_CKPT` exists and the config is the default one (or not given), the run
    uses the bundled demo model (:data:`DEMO_CKPT` with :data:`DEMO_CONFIG`, 64x64 images of simple shapes) and
    says so in one warning line.

    Raises:
        SdgenError: the config or the checkpoint does not exist (the message says where the originals
            expect the checkpoint and how to pass another one).
    """
    config_path = _find(config or DEFAULT_CONFIG)
    if not config_path.is_file():
        raise SdgenError(f"config not found: {config or DEFAULT_CONFIG} (pass --config PATH)")
    ckpt_path = _find(ckpt or DEFAULT_CKPT)
    if not ckpt_path.is_file():
        if ckpt is None:
            demo = demo_model_files()
            if demo is not None and config_path == _find(DEFAULT_CONFIG):
                logger.warning(
                    "no Stable Diffusion checkpoint found (none at %s): using the bundled demo model %s "
                    "(64x64 images of simple colored shapes); pass --ckpt PATH (.ckpt or .safetensors) for a real one",
                    DEFAULT_CKPT, DEMO_CKPT,
                )
                return demo
            raise SdgenError(
                f"checkpoint not found: {DEFAULT_CKPT} is where the original scripts expect the SD 1.x "
                "weights (e.g. sd-v1-4.ckpt, linked or copied there); or pass --ckpt PATH (.ckpt or .safetensors)"
            )
        raise SdgenError(f"checkpoint not found: {ckpt} (pass --ckpt PATH to a .ckpt or .safetensors file)")
    return ModelFiles(config=config_path, checkpoint=ckpt_path)


def demo_model_files() -> Optional[ModelFiles]:
    """The bundled demo model (:data:`DEMO_CONFIG`, :data:`DEMO_CKPT`), or None where it is not installed."""
    config_path, ckpt_path = bundled_path(DEMO_CONFIG), bundled_path(DEMO_CKPT)
    if config_path.is_file() and ckpt_path.is_file():
        return ModelFiles(config=config_path.resolve(), checkpoint=ckpt_path.resolve())
    return None


def vae_downsampling_factor(config: Any) -> int:
    """2 ** (len(ch_mult) - 1) of the config's first stage (8 for SD; 2 for the tiny test configs)."""
    try:
        params = config["model"]["params"]["first_stage_config"]["params"]
        return 2 ** (len(params["ddconfig"]["ch_mult"]) - 1)
    except (KeyError, TypeError) as exc:
        raise SdgenError("the config has no first_stage_config.params.ddconfig.ch_mult (not an SD config?)") from exc


def unet_params(config: Any) -> Optional[Mapping[str, Any]]:
    """The UNet's params in a config: ``unet_config`` (LatentDiffusion) or ``network_config`` (SDXL), else None."""
    try:
        params = config["model"]["params"]
    except (KeyError, TypeError):
        return None
    for key in ("unet_config", "network_config"):
        node = params.get(key, None) if hasattr(params, "get") else None
        if node is not None:
            return node.get("params", None) or {}
    return None


def unet_size_multiple(config: Any) -> int:
    """Latent sides must be multiples of this: 2 ** (number of UNet downsamplings), 1 when unknown."""
    params = unet_params(config)
    try:
        return 2 ** (len(params["channel_mult"]) - 1)
    except (KeyError, TypeError):
        return 1


def latent_size_multiple(config: Any) -> int:
    """Image sides must be multiples of this: VAE factor x UNet downsampling (64 for SD and SDXL)."""
    return vae_downsampling_factor(config) * unet_size_multiple(config)


def unet_in_channels(config: Any) -> Optional[int]:
    """The UNet's input channels (the latent channels C), None when the config does not say."""
    params = unet_params(config)
    try:
        return int(params["in_channels"])
    except (KeyError, TypeError):
        return None


def check_sampler_grid(config: Any, sampler: str, steps: int) -> None:
    """Build the sampler's sigma grid from the config's DDPM schedule, so a step count the grid refuses fails
    before the model is loaded (raises the grid's SdgenError)."""
    try:
        params = config["model"]["params"]
        betas = schedules.make_beta_schedule(
            params.get("beta_schedule", "linear"),
            int(params.get("timesteps", 1000)),
            linear_start=float(params.get("linear_start", 1e-4)),  # LatentDiffusion's defaults
            linear_end=float(params.get("linear_end", 2e-2)),
        )
    except (KeyError, TypeError, AttributeError):
        return
    sampler_sigmas(sampler, schedules.alphas_cumprod_from_betas(betas), steps)


# ----------------------------------------------------------------------------- request


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: its position in the run, its seed, its prompt and its slot in the batch."""

    index: int
    seed: int
    prompt: str
    batch: int
    position: int


def prompt_batches(prompts: Sequence[str], batch_size: int, per_image: bool) -> list[list[str]]:
    """The prompts of each batch of one iteration (CV scripts/txt2img.py).

    ``per_image=False``: one prompt, ``batch_size`` copies in one batch. ``per_image=True`` (--from-file):
    each prompt is one image, chunked into batches of ``batch_size`` (the last may be smaller).
    """
    if not prompts:
        raise SdgenError("no prompts to render")
    if not per_image:
        return [[prompts[0]] * batch_size]
    return [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]


@dataclass
class GenerationRequest:
    """A whole run.

    Attributes:
        batches: prompts of each batch of one iteration (:func:`prompt_batches`); the run repeats them
            ``n_iter`` times.
        negative_prompt: the unconditional prompt of classifier-free guidance ("" as in the originals).
        sampler: a key of :data:`ldm.sampling.samplers.SAMPLERS`; ``steps`` its number of steps.
        scale: guidance scale (1.0: no unconditional pass); ``eta``: DDIM eta (DDIM/PLMS only).
        height, width: image size in pixels; ``factor`` the VAE downsampling, ``latent_channels`` C.
        seed: image i uses ``seed + i``; with ``fixed_code`` image k of every batch uses ``seed + k``.
        init_image: img2img input (3, H, W) in [-1, 1], or None for txt2img; ``strength`` in (0, 1].
        precision: autocast (fp16 autocast on CUDA, fp32 elsewhere), full, bf16 or fp16 (autocast dtypes).
    """

    batches: list[list[str]]
    n_iter: int = 1
    negative_prompt: str = ""
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    latent_channels: int = 4
    factor: int = 8
    seed: int = 42
    fixed_code: bool = False
    init_image: Optional[torch.Tensor] = None
    strength: float = 0.75
    precision: str = "autocast"
    sampler_options: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-image latent shape (C, H / f, W / f)."""
        return (self.latent_channels, self.height // self.factor, self.width // self.factor)

    def jobs(self) -> list[list[ImageJob]]:
        """Every batch of the run, in order, with per-image seeds."""
        out: list[list[ImageJob]] = []
        index = 0
        for _ in range(self.n_iter):
            for prompts in self.batches:
                batch = []
                for position, prompt in enumerate(prompts):
                    seed = self.seed + (position if self.fixed_code else index)
                    batch.append(ImageJob(index, seed, prompt, len(out), position))
                    index += 1
                out.append(batch)
        return out

    @property
    def num_images(self) -> int:
        return self.n_iter * sum(len(b) for b in self.batches)

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the sampler: ``sampler_options``, plus ``eta`` for DDIM / PLMS."""
        options = dict(self.sampler_options)
        if self.sampler in ("ddim", "plms"):
            options.setdefault("eta", self.eta)
        return options


@dataclass
class GeneratedImage:
    """A finished image: its job, its pixels (H, W, 3) uint8, and the safety checker's verdict (None: no checker
    ran; True: flagged, the pixels are black)."""

    job: ImageJob
    pixels: np.ndarray
    flagged: Optional[bool] = None


class Guidance(Protocol):
    """A guidance method replacing plain CFG (e.g. :class:`ldm.sampling.sld.SLDGuidance`).

    ``guider(denoiser, scale)`` gives a fresh guider per batch (it may keep per-step state and expose
    ``on_step_end(info)``, which the loop calls from the sampler callback); ``extra_cond(encode, batch_size,
    scale)`` gives the cond entries it needs besides "cond" and "uncond" (``encode`` is the conditioner's
    prompts -> cond dict function).
    """

    def guider(self, denoiser: Callable[..., torch.Tensor], scale: float) -> Callable[..., torch.Tensor]: ...

    def extra_cond(self, encode: Callable[[list[str]], dict], batch_size: int, scale: float) -> dict: ...


class Conditioner(Protocol):
    """A batch of jobs -> the guider's cond: ``{"cond": dict, "uncond": dict}`` of network inputs
    (``{"crossattn": (B, L, D), "vector": (B, A), ...}``), "uncond" only when ``request.scale != 1``.

    ``encode(prompts)`` gives the cond dict of a list of prompts (what a :class:`Guidance` encodes its extra
    prompts with, e.g. the SLD safety concept).
    """

    def __call__(self, jobs: Sequence[ImageJob], request: "GenerationRequest") -> dict[str, dict[str, Any]]: ...

    def encode(self, prompts: list[str]) -> dict[str, Any]: ...


class TextConditioner:
    """SD 1.x / 2.x text conditioning: each job's prompt, and ``request.negative_prompt`` for the unconditional
    branch of classifier-free guidance, through ``model.get_learned_conditioning`` (cond key "crossattn").

    Subclasses add per-image inputs to both branches (:class:`ldm.models.diffusion.unclip.ImageVariationConditioning`).
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode(self, prompts: list[str]) -> dict[str, Any]:
        """Prompts -> ``{"crossattn": (len(prompts), L, D)}``."""
        return {"crossattn": self.model.get_learned_conditioning(list(prompts))}

    def __call__(self, jobs: Sequence[ImageJob], request: "GenerationRequest") -> dict[str, dict[str, Any]]:
        cond = {"cond": self.encode([job.prompt for job in jobs])}
        if request.scale != 1.0:
            cond["uncond"] = self.encode([request.negative_prompt] * len(jobs))
        return cond


def make_denoiser(model: Any, sampler: str) -> Denoiser:
    """``D(x, sigma, cond)`` around ``model.apply_model`` with the time mode of the sampler's original grid."""
    return Denoiser(
        model.apply_model,
        model.alphas_cumprod,
        parameterization=model.parameterization,
        time_mode=default_time_mode(sampler),
    )


def precision_context(precision: str, device: torch.device) -> ContextManager[Any]:
    """Autocast for a precision name: autocast = fp16 on CUDA only (the originals), bf16/fp16 anywhere."""
    if precision not in PRECISIONS:
        raise SdgenError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    if precision == "full" or (precision == "autocast" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def img2img_sigmas(sampler: str, sigmas: torch.Tensor, strength: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise level of the init latent, descending grid to run) for img2img.

    On the CompVis DDIM grid: CV scripts/img2img.py (``t_enc = int(strength * steps)``, its off-by-one kept);
    where the original fails (t_enc past the last step, i.e. strength 1.0) the latent is noised to the top of
    the grid and every step runs. On other grids: SGM's pruning (keep the ``int(strength * len)`` lowest).
    """
    if DEFAULT_GRID[sampler] == "ddim":
        n = len(sigmas) - 1
        if int(strength * steps) >= n:
            return sigmas[0], sigmas
        return schedules.compvis_img2img_sigmas(sigmas, strength, steps)
    run = schedules.Img2ImgDiscretizationWrapper(lambda: sigmas, strength)()
    return run[0], run


def quantize(images: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, truncating like CV txt2img."""
    return _to_uint8(_to_unit_range(images))


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> float32 in [0, 1] (clamped)."""
    return torch.clamp((images.float() + 1.0) / 2.0, 0.0, 1.0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 by truncation (CV txt2img)."""
    return (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


def finished_images(
    decoded: torch.Tensor, jobs: Sequence[ImageJob], safety_checker: Optional[Any] = None
) -> Iterator[GeneratedImage]:
    """A decoded batch (B, 3, H, W) in [-1, 1] -> one :class:`GeneratedImage` per job.

    With a ``safety_checker`` (:class:`ldm.safety.checker.SafetyChecker`) flagged images come out black
    (CV txt2img ``check_safety`` on the decoded [0, 1] images, before quantisation).
    """
    x01 = _to_unit_range(decoded)
    flagged: list[Optional[bool]] = [None] * len(jobs)
    if safety_checker is not None:
        from ldm.safety.checker import apply_safety_checker

        x01, checked = apply_safety_checker(x01, safety_checker)
        flagged = list(checked)
    for job, pixels, flag in zip(jobs, _to_uint8(x01), flagged):
        yield GeneratedImage(job, pixels, flag)


def encode_init_image(model: Any, image: torch.Tensor, precision: str) -> Any:
    """The VAE posterior of an init image (3, H, W) in [-1, 1], encoded once per run (float32 input)."""
    device = model_device(model)
    with precision_context(precision, device):
        return model.encode_first_stage(image[None].to(device=device, dtype=torch.float32))


def sample_init_latents(model: Any, posterior: Any, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One posterior sample per image (image i draws from ``generators[i]``), scaled: (B, C, h, w) float32."""
    params = posterior.parameters.expand(len(generators), *posterior.parameters.shape[1:])
    return model.get_first_stage_encoding(type(posterior)(params), generator=list(generators)).float()


StepCallback = Callable[[int, int], None]
BatchCallback = Callable[[list[ImageJob]], None]


@torch.no_grad()
def generate(
    model: Any,
    request: GenerationRequest,
    *,
    on_step: Optional[StepCallback] = None,
    on_batch: Optional[BatchCallback] = None,
    conditioner: Optional[Conditioner] = None,
    denoiser: Optional[Callable[..., torch.Tensor]] = None,
    guidance: Optional[Guidance] = None,
    safety_checker: Optional[Any] = None,
) -> Iterator[GeneratedImage]:
    """Run ``request`` on ``model``, yielding each image once its batch is decoded.

    Args:
        on_step: called as ``on_step(done, total)`` after each sampler step of a batch.
        on_batch: called with the batch's jobs before it starts.
        conditioner: the batch's cond / uncond (:class:`Conditioner`); default :class:`TextConditioner`.
        denoiser: replaces the apply_model denoiser (:func:`make_denoiser`).
        guidance: replaces classifier-free guidance (e.g. Safe Latent Diffusion), see :class:`Guidance`.
        safety_checker: a :class:`ldm.safety.checker.SafetyChecker`; flagged images come out black
            (:func:`finished_images`).
    """
    if request.sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {request.sampler!r} ({', '.join(SAMPLERS)})")
    if request.init_image is not None and tuple(request.init_image.shape[-2:]) != (request.height, request.width):
        raise SdgenError(
            f"the init image is {request.init_image.shape[-1]}x{request.init_image.shape[-2]} but the request "
            f"asks for {request.width}x{request.height}"
        )
    device = model_device(model)
    conditioning = conditioner or TextConditioner(model)
    base = denoiser or make_denoiser(model, request.sampler)
    sampler = SAMPLERS[request.sampler]
    sigmas = sampler_sigmas(request.sampler, model.alphas_cumprod, request.steps)
    start_sigma = None
    init_posterior = None
    if request.init_image is not None:
        start_sigma, sigmas = img2img_sigmas(request.sampler, sigmas, request.strength, request.steps)
        init_posterior = encode_init_image(model, request.init_image, request.precision)
    options = request.sampler_kwargs()
    total_steps = len(sigmas) - 1
    shape = request.latent_shape

    for jobs in request.jobs():
        if on_batch is not None:
            on_batch(jobs)
        seeds = [job.seed for job in jobs]
        generators = noise_lib.make_generators(seeds)
        # image i's first draw is its initial noise (same for txt2img and img2img), then its posterior sample
        noise = noise_lib.initial_noise(shape, seeds, device=device, generators=generators)
        with precision_context(request.precision, device):
            cond = conditioning(jobs, request)
            if guidance is None:
                guided = CFGDenoiser(base, request.scale)
            else:
                guided = guidance.guider(base, request.scale)
                cond.update(guidance.extra_cond(conditioning.encode, len(jobs), request.scale))
            step_end = getattr(guided, "on_step_end", None)
            if init_posterior is None:
                x = initial_x(noise, sigmas)
            else:
                z0 = sample_init_latents(model, init_posterior, generators)
                x = _img2img_start(z0, noise, start_sigma, sigmas, request.sampler)
            noise_sampler = noise_lib.BatchedNoiseSampler(seeds, shape, device=device, generators=generators)

            def callback(info: Mapping[str, Any]) -> None:
                if step_end is not None:
                    step_end(info)
                if on_step is not None:
                    on_step(int(info["i"]) + 1, total_steps)

            x = sampler(guided, x, sigmas, extra_args={"cond": cond}, callback=callback,
                        noise_sampler=noise_sampler, **options)
            images = model.decode_first_stage(final_latent(x, sigmas))
        yield from finished_images(images, jobs, safety_checker)


def _img2img_start(
    z0: torch.Tensor, noise: torch.Tensor, start_sigma: torch.Tensor, sigmas: torch.Tensor, sampler: str
) -> torch.Tensor:
    """Sampler input for img2img: the init latents ``z0`` (B, C, h, w) noised to ``start_sigma``."""
    if DEFAULT_GRID[sampler] == "ddim":
        # CV DDIMSampler.stochastic_encode in VP space, then the sampler's VE variable at the grid's start
        z_enc = schedules.compvis_stochastic_encode(z0, noise, start_sigma)
        return schedules.vp_to_ve(z_enc, sigmas[0])
    return schedules.sgm_img2img_start(z0, noise, torch.as_tensor(start_sigma))


def model_device(model: Any) -> torch.device:
    """The device of a model: its ``device`` attribute, else that of its first parameter."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def read_image(path: str | os.PathLike, what: str = "init image") -> "PIL.Image.Image":
    """Open an image file as RGB, refusing a truncated or damaged one instead of decoding part of it.

    The file is checked whole first (PIL ``verify``: every PNG chunk's CRC up to IEND; a JPEG must reach its
    end-of-image marker), then decoded.
    """
    from PIL import Image, UnidentifiedImageError

    from ldm.files import looks_like, require_file

    p = require_file(path, what)
    try:
        with Image.open(p) as handle:
            kind = handle.format
            handle.verify()
        if kind == "JPEG" and p.read_bytes().rfind(b"\xff\xd9") < 2:
            raise SdgenError(f"the {what} {path} is a truncated JPEG (no end-of-image marker)")
        with Image.open(p) as handle:
            return handle.convert("RGB")
    except UnidentifiedImageError as exc:
        raise SdgenError(f"the {what} {path} is not an image (it looks like {looks_like(p)})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).split("\n")[0] or type(exc).__name__
        raise SdgenError(f"the {what} {path} is truncated or damaged ({reason})") from exc


def image_to_tensor(image: "PIL.Image.Image", size: Optional[tuple[int, int]], multiple: int) -> torch.Tensor:
    """An RGB image as (3, H, W) float32 in [-1, 1] (CV scripts/img2img.py ``load_img``).

    ``size`` = (width, height) to resize to; None keeps the image's size rounded down to ``multiple`` (the
    original rounds to 32 for f=8). Lanczos resampling as in the original.
    """
    from PIL import Image

    w, h = size if size is not None else (image.width - image.width % multiple, image.height - image.height % multiple)
    if w <= 0 or h <= 0:
        raise SdgenError(f"the init image ({image.width}x{image.height}) is smaller than {multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0
