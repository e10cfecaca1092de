"""``sdgen train``: train an autoencoder or a latent diffusion model from a config (CV ``main.py``).

The config has the original sections: ``model`` (``target``, ``params``, ``base_learning_rate``), ``data``
(a data module with ``train_dataloader()``), ``lightning.trainer`` (keyword arguments of
``pytorch_lightning.Trainer``), plus ``training`` for sdgen (:mod:`ldm.training.config`). The run itself is
:func:`ldm.training.fit.train`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def train(
    base: Annotated[list[str], typer.Option("--base", "-b", help="training config(s), merged left to right")] = [],
    logdir: Annotated[str, typer.Option(help="root folder for runs")] = "logs",
    name: Annotated[Optional[str], typer.Option(help="run name (default: the last config's file name)")] = None,
    resume: Annotated[Optional[str], typer.Option(help="a .ckpt from a previous run to continue from")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="optimizer steps (overrides the config)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="global seed (default: training.seed, else 23)")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Lightning devices, e.g. 1, 2 or auto")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="Lightning accelerator: cpu, gpu, auto")] = None,
    every_n_steps: Annotated[Optional[int], typer.Option("--every-n-steps", help="checkpoint every N steps")] = None,
    num_threads: Annotated[Optional[int], typer.Option("--num-threads", help="torch CPU threads")] = None,
    export: Annotated[Optional[str], typer.Option(help="also write the final (EMA) weights to this .safetensors")] = None,
    export_dtype: Annotated[str, typer.Option("--export-dtype", help="float32, float16 or bfloat16")] = "float32",
) -> None:
    """Train the model of a config (the demo: configs/demo/shapes-autoencoder.yaml, then shapes-ldm.yaml)."""
    from ldm.training.fit import train as fit

    result = fit(list(base), logdir=logdir, name=name, resume=resume, max_steps=max_steps, seed=seed, devices=devices,
                 accelerator=accelerator, every_n_steps=every_n_steps, num_threads=num_threads, export=export,
                 export_dtype=export_dtype)
    typer.echo(f"trained to step {result.global_step}; weights: {result.last_weights}")
    if result.exported is not None:
        typer.echo(f"exported {result.exported} ({export_dtype})")
