"""Training on PyTorch's own distributed engine: ``torchrun`` starts the processes, this module joins them.

``torchrun --nproc_per_node N ... -m pipelines.cli train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`join_process_group` reads them and
initialises ``torch.distributed`` (gloo on the CPU, nccl on CUDA). Without them the run is a
single process and every helper here is a no-op.

Negatives and in-batch miners choose among the captions of *all* ranks: :meth:`Distributed.gather`
concatenates a per-rank tensor across ranks in rank order; the local part keeps its gradient, scaled
by the world size, so that DistributedDataParallel's gradient averaging gives exactly the gradient
of one process that saw the whole global batch (the approach of open_clip's ``gather_features``,
with the scaling made explicit).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from retrieval.errors import ConfigError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: str) -> str:
    """The collective backend for a device: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """One GPU per process on a node: ``cuda`` becomes ``cuda:<local rank>``; the CPU stays ``cpu``."""
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return device
    if parsed.index is not None and parsed.index != local_rank:
        raise ConfigError(f"train.device: {device!r} names one GPU, but under torchrun each process takes the GPU "
                          f"of its local rank (here {local_rank}); set train.device to cuda or auto")
    return f"cuda:{local_rank}"


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run a block on rank 0 first, then on the others (for work that writes a file the others reuse)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate ``local`` (B_r, ...) of every rank in rank order; B_r may differ between ranks.

        The local rows keep their gradient, multiplied by the world size: DistributedDataParallel
        averages gradients over ranks, and each rank's loss sees the whole global batch, so the
        averaged gradient equals that of one process over the global batch. Other ranks' rows
        carry no gradient.
        """
        if not self.active:
            return local
        sizes = self.gather_sizes(local.shape[0], local.device)
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        pieces = [part[:size] for part, size in zip(parts, sizes)]
        if local.requires_grad:
            scale = float(self.world_size)
            pieces[self.rank] = local * scale - local.detach() * (scale - 1.0)  # value: local; gradient: × world
        return torch.cat(pieces)

    def gather_sizes(self, size: int, device: torch.device | str) -> list[int]:
        """The batch size of every rank."""
        if not self.active:
            return [size]
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device))
        return [int(s.item()) for s in sizes]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (plain Python values: RNG states, counters), in rank order."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


SINGLE_PROCESS = Distributed()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher speaking its environment protocol) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def join_process_group(device: str, timeout_minutes: float = 30.0) -> tuple[Distributed, str]:
    """Join the training processes torchrun started; returns this process's place and its device.

    A single process (no torchrun environment, or a world of one) joins nothing and keeps ``device``.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Distributed(), device
    place = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = rank_device(device, place.local_rank)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        options: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
        if torch.device(device).type == "cuda":
            options["device_id"] = torch.device(device)
        dist.init_process_group(backend_for(device), **options)
    return place, device


def leave_process_group() -> None:
    """Tear the process group down at the end of a run (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
