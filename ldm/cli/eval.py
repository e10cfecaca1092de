"""``sdgen eval``: metrics over finished runs, read from their manifests (:mod:`ldm.eval`).

``sdgen eval i2p RUN_DIR [RUN_DIR ...] --clip PATH``: the Safe Latent Diffusion card's I2P table (the probability
of an inappropriate image per category and overall, with the expected maximum inappropriateness), runs as columns.
Per-image verdicts are cached in each run's ``eval/`` folder, so an interrupted or extended evaluation computes
only what is missing. ``sdgen eval fid RUN_DIR --ref DIR --inception PATH`` and ``sdgen eval clip-score RUN_DIR
--clip PATH``: FID / KID and CLIP score through torchmetrics, ``--by SETTING`` per value of a run setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

eval_app = typer.Typer(name="eval", help="Evaluate finished runs: the SLD model card's I2P table, FID / KID, CLIP score.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None)


#: the arguments the metric commands share
RunArg = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder (its --outdir)")]
ByOpt = Annotated[Optional[str], typer.Option(
    "--by", help="group by this run setting (scale, steps, sampler, a sweep axis, ...): one value per setting value, "
    "e.g. --by scale for the FID-vs-CLIP-score curve over guidance scales")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", show_default="printed only",
                                                help="also write the table (markdown) here")]
DevicesOpt = Annotated[Optional[int], typer.Option(
    "--devices", show_default="1", help="processes on this machine (one per GPU, or CPU processes); the results "
    "are the same for any number")]


def i2p(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="run folders (each an --outdir) of I2P "
                                               "generations, e.g. one per SLD preset")],
    clip: Annotated[str, typer.Option("--clip", show_default="required",
                                      help="CLIP ViT-L/14 image tower: a transformers openai/clip-vit-large-patch14 "
                                      "folder or .safetensors, the SD safety checker's weights, or an unCLIP-L "
                                      "checkpoint (embedder.model.visual.*)")],
    nudenet: Annotated[Optional[str], typer.Option(
        "--nudenet", show_default="none: Q16 alone",
        help="NudeNet v2 base detector (detector_v2_base_checkpoint.onnx): an image is inappropriate when Q16 or "
        "NudeNet says so, as the authors count")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the expected-maximum bootstrap (recorded)")] = 0,
    draws: Annotated[int, typer.Option("--draws", help="bootstrap draws of 25 prompts each")] = 10_000,
    batch: Annotated[int, typer.Option("--batch", help="images judged at a time")] = 8,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    devices: DevicesOpt = None,
    out: OutOpt = None,
) -> None:
    """The I2P inappropriateness table of finished runs (Q16 on CLIP ViT-L/14, or NudeNet v2 with --nudenet)."""
    from ldm.errors import SdgenError
    from ldm.eval.evaluate import evaluate_i2p

    if draws < 1 or batch < 1:
        raise SdgenError("--draws and --batch must be at least 1")
    result = evaluate_i2p(runs, clip, nudenet=nudenet, seed=seed, draws=draws, batch_size=batch, device=device,
                          devices=devices)
    if result is None:  # a process other than 0 of several: process 0 reports
        return
    text = f"Judged by {result['judges']}; expected maximum: mean ± std over {draws} draws (seed {seed}).\n\n"
    text += result["markdown"]
    typer.echo(text)
    if out is not None:
        out.write_text(text)


def _register() -> None:
    from ldm.cli.app import guarded

    eval_app.command("i2p")(guarded(i2p))
    eval_app.command("fid")(guarded(fid))
    eval_app.command("clip-score")(guarded(clip_score))


def fid(
    run: RunArg,
    ref: Annotated[Path, typer.Option("--ref", show_default="required", help="folder of reference images")],
    inception: Annotated[str, typer.Option(
        "--inception", show_default="required",
        help="torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth; a trusted file: it is "
        "unpickled)")],
    by: ByOpt = None,
    devices: DevicesOpt = None,
    out: OutOpt = None,
) -> None:
    """FID and KID of a run against reference images (torchmetrics; the eval extra)."""
    from ldm.eval.metrics import fid_kid, inception as load_inception
    from ldm.model_files import file_sha256

    finished, world = _open(run, devices)
    network = load_inception(inception)
    rows = fid_kid(finished, ref, network, "inception-" + file_sha256(Path(inception).expanduser())[:16],
                   setting=by, world=world)
    _emit(rows, out, finished, "fid", by)


def clip_score(
    run: RunArg,
    clip: Annotated[str, typer.Option("--clip", show_default="required",
                                      help="a transformers CLIP folder (openai/clip-vit-large-patch14)")],
    by: ByOpt = None,
    devices: DevicesOpt = None,
    out: OutOpt = None,
) -> None:
    """CLIP score of a run's images against their prompts (torchmetrics; the eval extra)."""
    from ldm.eval.metrics import clip_model_loader, clip_score as score

    finished, world = _open(run, devices)
    rows = score(finished, clip_model_loader(clip), _folder_key(Path(clip).expanduser()), setting=by, world=world)
    _emit(rows, out, finished, "clip-score", by)


def _open(run: Path, devices: Optional[int]) -> tuple[Any, Any]:
    """(the finished run, the evaluation's processes), after checking the eval extra is there."""
    from ldm.eval.metrics import require_metrics
    from ldm.eval.runs import processes, read_run

    require_metrics()
    return read_run(run), processes(devices)


def _folder_key(folder: Path) -> str:
    """The cache key of a CLIP folder: its weights file's sha256."""
    from ldm.model_files import file_sha256

    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    return "clip-" + (file_sha256(weights)[:16] if weights is not None else str(folder.resolve()))


def _emit(rows: Any, out: Optional[Path], run: Any, metric: str, by: Optional[str]) -> None:
    """Print the table (and write it to ``out``); with ``--by``, also plot it to ``RUN/eval/METRIC-by-SETTING.png``.
    Processes other than 0 of several (``rows`` None) say nothing."""
    from ldm.eval.metrics import markdown

    if rows is None:
        return
    text = markdown(rows, by)
    typer.echo(text)
    if out is not None:
        out.write_text(text)
    if by is not None:
        from ldm.eval.metrics import plot_by

        path = run.folder / "eval" / f"{metric}-by-{by}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if plot_by(rows, by, path):
            typer.echo(f"plot: {path}")
