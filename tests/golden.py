"""Access to the golden vectors produced by the original code on tiny models (tests/data/golden).

See tests/data/golden/README.md for how they were made. ``case_state_dict`` rebuilds a case's complete
state_dict: random parameters are drawn exactly as the generator did (one CPU generator seeded 0, keys in
sorted order, ``randn * 0.05``), buffers are taken from the stored file.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "data" / "golden"
MANIFESTS = Path(__file__).parent / "data" / "manifests"
CASES = ("sd1", "sd2v", "unclip-l", "sdxl-base", "sdxl-base-081e0d4", "sdxl-refiner")


def case_config(case: str):
    """The reference yaml of a case (OmegaConf), including ``golden_tiny_encoder_sizes``."""
    return OmegaConf.load(GOLDEN / f"{case}.yaml")


@lru_cache(maxsize=None)
def case_data(case: str) -> dict[str, torch.Tensor]:
    """Inputs and expected outputs of a case (see the golden README for the names)."""
    return load_file(str(GOLDEN / f"{case}.data.safetensors"))


@lru_cache(maxsize=None)
def case_state_dict(case: str) -> dict[str, torch.Tensor]:
    """The complete reference state_dict of a case, keys as the original code names them (kept for the session)."""
    return build_case_state_dict(case)


def build_case_state_dict(case: str) -> dict[str, torch.Tensor]:
    """:func:`case_state_dict` without the cache (for large cases: midas-dpt-hybrid is 123M numbers, 0.5 GB).

    A case whose state_dict has no buffers (midas-dpt-hybrid) ships only its manifest: every entry is drawn.
    """
    weights_path = GOLDEN / f"{case}.weights.safetensors"
    stored = load_file(str(weights_path)) if weights_path.exists() else {}
    manifest_path = GOLDEN / f"{case}.weights-manifest.json"
    if not manifest_path.exists():
        return stored
    manifest = json.loads(manifest_path.read_text())
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for entry in manifest["tensors"]:
        key = entry["key"]
        if entry["randomized"]:
            out[key] = torch.randn(entry["shape"], generator=g, dtype=torch.float32) * 0.05
        else:
            out[key] = stored[key]
    return out


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted keys and raw little-endian tensor bytes, as the manifests record it."""
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(key.encode("utf-8"))
        h.update(sd[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def manifest_sha256(case: str) -> str | None:
    path = GOLDEN / f"{case}.weights-manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["sha256_of_sorted_key_and_bytes"]


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` with the prefix removed (e.g. 'model.diffusion_model.')."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def released_manifest(name: str) -> dict:
    """A released file's key/shape manifest (tests/data/manifests/NAME.json)."""
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def sample(name: str, denoiser, noise: torch.Tensor, sigmas: torch.Tensor, *, extra_args=None, callback=None,
           noise_sampler=None, **options) -> torch.Tensor:
    """Run sampler ``name`` from unit VP noise on ``sigmas`` and return the latent to decode (VP), as the generation
    loop does (:func:`ldm.generation.generate.generate`): the originals' initial scaling and final latent."""
    from ldm.sampling.grids import final_latent, initial_x
    from ldm.sampling.samplers import SAMPLERS

    x = SAMPLERS[name](denoiser, initial_x(noise, sigmas), sigmas, extra_args=extra_args, callback=callback,
                       noise_sampler=noise_sampler, **options)
    return final_latent(x, sigmas)


#: the micro-conditioning numbers behind each golden Fourier vector (README 4a, 5a), in concatenation order
FOURIER_INPUTS = {
    "vector_fourier": ("in.original_size_as_tuple", "in.crop_coords_top_left", "in.target_size_as_tuple"),
    "vector_fourier.aes6": ("in.original_size_as_tuple", "in.crop_coords_top_left", "in.aesthetic_score.c"),
    "vector_fourier.aes2_5": ("in.original_size_as_tuple", "in.crop_coords_top_left", "in.aesthetic_score.uc"),
}


def fourier_tolerance(data: dict[str, torch.Tensor], name: str):
    """The cross-CPU tolerance of golden Fourier vector ``name`` (256 dimensions per number)."""
    from tests.tolerance import sinusoid_tolerance

    numbers = torch.cat([data[k].reshape(len(data[k]), -1) for k in FOURIER_INPUTS[name]], 1)
    return sinusoid_tolerance(numbers, 256)


def adm_tolerance(level: int, width: int = 16):
    """The cross-CPU tolerance of the golden unCLIP ADM vector ``[augmented embedding | level embedding]`` (README
    3a): the augmentation is a few float32 operations per value (1e-6 relative and absolute); the level embedding is
    sinusoidal (:func:`tests.tolerance.sinusoid_tolerance` of the level, on top of the same 1e-6)."""
    from tests.tolerance import Tolerance, sinusoid_tolerance

    level_bound = sinusoid_tolerance(torch.tensor([[float(level)]]), width).abs
    bound = torch.cat([torch.zeros(1, width, dtype=torch.float64), level_bound], 1) + 1e-6
    return Tolerance(why="float32 noise augmentation, and a level embedding whose arguments carry the CPU's exp "
                         "rounding", abs=bound, rel=1e-6)
