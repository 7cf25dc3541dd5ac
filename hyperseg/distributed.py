"""``torch.distributed`` set-up for training and evaluation under ``torchrun``.

``torchrun`` starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
without them the run is a single process. CUDA runs use NCCL, CPU runs gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A distributed set-up that cannot work."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 without it)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device: torch.device) -> Context:
    """Join the process group that torchrun describes (if any) and pick this rank's device.

    ``device`` is the requested device; a CUDA device becomes ``cuda:LOCAL_RANK`` when there are
    several processes. Call ``teardown`` when done.
    """
    world_size = launched_world_size()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} / WORLD_SIZE={world_size} do not describe a process")
    if device.type == "cuda":
        if world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} "
                    f"CUDA device(s): start at most that many processes per node "
                    f"(--nproc_per_node)")
            device = torch.device("cuda", local_rank)
        if device.index is not None:          # "cuda" alone: the current device
            torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed support")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(context: Optional[Context]) -> None:
    """Leave the process group joined by ``setup``."""
    if context is not None and context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (a no-op in a single process)."""
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them at the start of each forward pass, so after the last training step each
    rank still holds the statistics of its own last batch; this makes them equal again.
    """
    if is_active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src)
