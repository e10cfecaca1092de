"""FID, KID and CLIP score of finished runs, through torchmetrics (the ``eval`` extra), grouped by a run setting.

- FID / KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with torch-fidelity's
  Inception v3, its weights from ``--inception PATH`` (``weights-inception-2015-12-05-6726825d.pth``; sdgen never
  downloads it; torch-fidelity unpickles that file fully, so it must be the trusted original), against a folder of
  reference images (``--ref``). Images go in as uint8; torchmetrics resizes them to 299 px.
- CLIP score: torchmetrics' CLIP score (100 x cosine of CLIP image and text features, the mean clamped at 0) of
  each image and its prompt (from the manifest), with a transformers CLIP folder (``--clip``), read offline.
- Per-image results (features, per-pair scores) are cached in the run folder as they are computed, and
  ``--devices N`` splits the images over processes in fixed chunks (:mod:`ldm.eval.features`).
- ``--by SETTING``: one value per distinct value of a run setting (``scale``, ``steps``, a sweep axis, ...), read
  from each image's own record in its PNG; e.g. ``--by scale`` gives the FID-vs-CLIP-score curve over guidance
  scales that SD papers plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.errors import SdgenError
from ldm.eval.runs import Run, RunImage

EXTRA_HINT = "pip install 'sdgen[eval]' (torchmetrics, torch-fidelity, onnxruntime, matplotlib)"


def require_metrics() -> None:
    """One line saying what to install when the ``eval`` extra is missing."""
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise SdgenError(f"sdgen eval needs the eval extra: {EXTRA_HINT}") from None


def setting_of(image: RunImage, setting: Optional[str]) -> Any:
    """The value of run setting ``setting`` for one image (its PNG's job record); "all" without a setting."""
    if setting is None:
        return "all"
    from ldm.output import read_job

    job = read_job(image.file) or {}
    settings = dict(job.get("settings") or {})
    if setting == "seed":
        return job.get("seed")
    if setting not in settings:
        known = ", ".join(sorted(k for k, v in settings.items() if not isinstance(v, (dict, list))))
        raise SdgenError(f"--by {setting}: not a setting of {image.file.name} (known: {known})")
    return settings[setting]


def groups(run: Run, setting: Optional[str]) -> dict[Any, list[RunImage]]:
    out: dict[Any, list[RunImage]] = {}
    for image in run.images:
        out.setdefault(setting_of(image, setting), []).append(image)
    return dict(sorted(out.items(), key=lambda kv: (str(type(kv[0])), kv[0])))


def inception(path: str | Path, features: int = 2048) -> torch.nn.Module:
    """torch-fidelity's Inception v3 with its weights from ``path`` (torchmetrics' ``NoTrainInceptionV3``)."""
    require_metrics()
    p = Path(path).expanduser()
    if not p.is_file():
        raise SdgenError(f"--inception not found: {path} (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise SdgenError(f"FID / KID need the eval extra: {EXTRA_HINT}") from None
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                                  feature_extractor_weights_path=str(p))
    except Exception as exc:  # torch-fidelity / torch.load errors for a file of the wrong kind
        raise SdgenError(f"--inception {path} is not torch-fidelity's Inception weights: "
                         f"{str(exc).splitlines()[0][:160]}") from None


class Precomputed(torch.nn.Module):
    """The "network" that torchmetrics' FID / KID get when the features are computed (and cached) already."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(run: Run, reference: str | Path, network: torch.nn.Module, key: str, *, setting: Optional[str] = None,
            kid_subset: int = 1000, world: Any = None,
            on_chunk: Optional[Callable[[int], None]] = None) -> Optional[dict[Any, dict[str, float]]]:
    """FID and KID (mean, std) of the run's images (per value of ``setting``) against the images of folder
    ``reference``, from the network's features (``key`` names its weights), cached per chunk in ``RUN/eval/``
    (:mod:`ldm.eval.features`). None in processes other than 0 of several."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise SdgenError(f"FID / KID need the eval extra: {EXTRA_HINT}") from None
    from ldm.eval.features import features, reference_key, reference_run

    ref = reference_run(reference)
    grouped = groups(run, setting)
    own = features(run, network, run.folder / "eval" / f"features-{key}", world=world, on_chunk=on_chunk)
    theirs = features(ref, network, run.folder / "eval" / f"reference-{key}-{reference_key(ref)}", world=world,
                      resize=True, on_chunk=on_chunk)
    if own is None or theirs is None:
        return None
    row_of = {id(image): k for k, image in enumerate(run.images)}
    real = torch.from_numpy(theirs)
    out = {}
    for value, images in grouped.items():
        if len(images) < 2:
            raise SdgenError(f"FID / KID need at least 2 images per group; {setting}={value} has {len(images)}")
        fake = torch.from_numpy(own[[row_of[id(image)] for image in images]])
        fid = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), reset_real_features=False)
        subset = min(kid_subset, len(images), len(real))
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=subset, subsets=100,
                                      reset_real_features=False)
        for metric in (fid, kid):
            metric.set_dtype(torch.float64)
            metric.update(real, real=True)
            metric.update(fake, real=False)
        kid_mean, kid_std = kid.compute()
        out[value] = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
                      "images": len(images)}
    return out


def clip_model_loader(folder: str | Path) -> Callable[[], tuple[Any, Any]]:
    """A ``() -> (CLIPModel, CLIPProcessor)`` for torchmetrics, from a local transformers folder (offline)."""
    p = Path(folder).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise SdgenError(f"--clip {folder}: CLIP score takes a transformers CLIP folder (config.json, weights, "
                         "tokenizer files: openai/clip-vit-large-patch14)")

    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        return (CLIPModel.from_pretrained(str(p), local_files_only=True),
                CLIPProcessor.from_pretrained(str(p), local_files_only=True))

    return load


def clip_score(run: Run, loader: Callable[[], tuple[Any, Any]], key: str, *, setting: Optional[str] = None,
               world: Any = None, on_chunk: Optional[Callable[[int], None]] = None
               ) -> Optional[dict[Any, dict[str, float]]]:
    """torchmetrics' CLIP score (the mean of the per-pair scores, clamped at 0) of each group's images against
    their prompts, from per-image scores cached in ``RUN/eval/clip-score.jsonl``. None in processes other than 0."""
    require_metrics()
    from ldm.eval.features import clip_scores

    grouped = groups(run, setting)
    cache = clip_scores(run, loader, key, world=world, on_chunk=on_chunk)
    if cache is None:
        return None
    out = {}
    for value, images in grouped.items():
        mean = float(np.mean([cache.get(run, image)["clip_score"] for image in images]))
        out[value] = {"clip_score": max(mean, 0.0), "images": len(images)}
    return out


def plot_by(rows: dict[Any, dict[str, float]], setting: str, path: Path) -> bool:
    """One line per metric over the values of ``setting`` (numbers on the x axis, else in order); False without
    matplotlib (the eval extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return False
    keys = [k for k in sorted({k for row in rows.values() for k in row}) if k != "images" and not k.endswith("_std")]
    values = list(rows)
    x = values if all(isinstance(v, (int, float)) for v in values) else list(range(len(values)))
    figure, axes = pyplot.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot(x, [rows[v][key] for v in values], marker="o")
        axis.set_xlabel(setting)
        axis.set_ylabel(key)
        if x is not values:
            axis.set_xticks(x, [str(v) for v in values])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def markdown(rows: dict[Any, dict[str, float]], setting: Optional[str]) -> str:
    keys = sorted({k for row in rows.values() for k in row})
    lines = [f"| {setting or 'run'} | {' | '.join(keys)} |", "|---|" + "---|" * len(keys)]
    for value, row in rows.items():
        lines.append(f"| {value} | " + " | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                                for k in keys) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["EXTRA_HINT", "Precomputed", "clip_model_loader", "clip_score", "fid_kid", "groups", "inception", "markdown",
           "plot_by", "require_metrics", "setting_of"]
