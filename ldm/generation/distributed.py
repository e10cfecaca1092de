"""Many processes, many machines: one run's batches shared out over processes that Lightning Fabric starts.

``--devices N`` starts N processes on this machine (one per GPU, or CPU processes talking over gloo),
``--num-nodes M`` spans machines; a run started by ``torchrun`` or inside a SLURM job is recognised by Fabric and
joins the processes they started. Batch b of the plan runs on process ``b % world_size``: every process plans the
same run and writes its own images, and since a batch is the unit of work (with each image's noise from its own
seed) the images are the same bit for bit whatever the number of processes. Before any work the processes check
that they run the same sdgen on the same files and write into one shared output folder.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch

from ldm import __version__
from ldm.errors import SdgenError

logger = logging.getLogger(__name__)

#: How long the processes wait for each other at the end of a run (the last one may finish hours later).
END_TIMEOUT = timedelta(days=7)


@dataclass
class World:
    """The processes of a run (one, without Fabric): this one's rank, their number, its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: int = 0
    device: Optional[torch.device] = None
    fabric: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        """Whether batch ``batch`` of the plan runs in this process."""
        return batch % self.size == self.rank

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, by rank (picklable objects)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value``, in every process."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_all(self) -> None:
        """Block until every process got here (no time limit that a long run could reach)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=END_TIMEOUT)
        dist.barrier(group=group)


def started_externally() -> bool:
    """Whether torchrun or SLURM started this process as one of several."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    slurm = SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return bool(TorchElasticEnvironment.detect() or slurm)


def _external_local_size() -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.split("(")[0].isdigit():
            return int(value.split("(")[0])
    return 1


def start(devices: Optional[int], num_nodes: int, accelerator: str, timeout: float,
          threads: Optional[int] = None) -> World:
    """The processes of a run: this one alone, or (``devices`` > 1, ``num_nodes`` > 1, torchrun, SLURM) all of
    them, started and connected by Lightning Fabric; raises SdgenError when they cannot be (no time-out hangs).

    On the CPU each process computes with ``threads`` threads, by default the machine's cores shared out over its
    processes. (The images are identical bit for bit at the same threads per process; oneDNN's convolutions sum in
    an order that follows the thread count, which moves at most a few pixel values by one level.)
    """
    external = started_externally()
    local = devices if devices is not None else (_external_local_size() if external else 1)
    if local == 1 and num_nodes == 1 and not external:
        if threads is not None:
            torch.set_num_threads(threads)
        return World()
    kind = {"gpu": "cuda"}.get(accelerator, accelerator)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        available = torch.cuda.device_count()
        if local > available:
            raise SdgenError(f"--devices {local} asks for more GPUs than this machine has ({available})")
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy

    for name in ("lightning_fabric", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    strategy = DDPStrategy(process_group_backend="nccl" if kind == "cuda" else "gloo",
                           timeout=timedelta(seconds=timeout))
    fabric = Fabric(accelerator=kind, devices=local, num_nodes=num_nodes, strategy=strategy)
    try:
        fabric.launch()
    except SdgenError:
        raise
    except Exception as exc:  # DistStoreError, RuntimeError, TimeoutError: a peer never showed up
        where = f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT', '?')}"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SdgenError(f"the {local * num_nodes} processes did not all connect within {timeout:g} s (rendezvous "
                         f"{where}): {first}") from None
    world = World(fabric.global_rank, fabric.world_size, fabric.local_rank, local, fabric.node_rank,
                  fabric.device, fabric)
    if kind == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    return world


def check_same_run(world: World, fingerprint: dict[str, Any]) -> None:
    """Refuse to start when the processes differ in sdgen version or in the files they would read (one line,
    in every process, before any image)."""
    mine = {"sdgen": __version__, **fingerprint}
    every = world.gather(mine)
    for rank, theirs in enumerate(every):
        for key, value in mine.items():
            if theirs.get(key) != every[0].get(key):
                what = "sdgen version" if key == "sdgen" else key.replace("_", " ")
                raise SdgenError(f"process {rank} differs from process 0 in its {what} ({theirs.get(key)!s:.40} vs "
                                 f"{every[0].get(key)!s:.40}): start every process with the same sdgen and files")


def check_shared_folder(world: World, folder: Path) -> None:
    """Refuse a run whose output folder is not one folder for all processes (machines without a shared file
    system would each write half a run)."""
    if world.size == 1:
        return
    token = world.broadcast(uuid.uuid4().hex if world.is_main else None)
    marker = folder / f".sdgen-shared-{token}"
    if world.is_main:
        marker.write_text(token)
    world.gather(None)  # the marker exists before anyone looks
    seen = world.gather(marker.is_file() and marker.read_text() == token)
    world.gather(None)
    if world.is_main:
        marker.unlink(missing_ok=True)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise SdgenError(f"the output folder {folder} is not shared between the machines: process {missing[0]} does "
                         "not see what process 0 writes there; put --outdir on a file system every machine mounts")
