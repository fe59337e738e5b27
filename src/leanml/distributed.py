"""Data parallelism on torch.distributed, launched by ``torchrun`` (never a home-made launcher).

Training (``leanml.distill``) and calibration (``leanml.calibrate``) use the same job: gloo on CPU, NCCL
when CUDA is present. Calibration splits its windows across ranks (:func:`shard`), sums the statistics
each rank gathered (:func:`all_reduce_sum`, :func:`all_reduce_max`) and shares the layers each rank
quantized (:func:`broadcast`), so every rank ends with the weights one process would compute.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` outside a torch.distributed job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the ``torchrun`` job this process was launched in (``WORLD_SIZE`` > 1): gloo on CPU, NCCL
    when CUDA is present. Returns whether a job is active."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if os.environ.get("MASTER_ADDR", "") in ("localhost", "127.0.0.1") and "GLOO_SOCKET_IFNAME" not in os.environ:
            # a one-machine job: gloo would otherwise bind to the address the host name resolves to,
            # which sandboxes and containers often leave unresolvable
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        import atexit

        atexit.register(_leave_distributed)
    return True


def _leave_distributed() -> None:
    """At exit: wait for every rank, then close the process group, so no rank tears down its connections
    while another still uses them (gloo aborts a process whose peer vanished: "terminate called without an
    active exception")."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer that already failed: torchrun reports that rank's error
        pass


def active() -> bool:
    """Whether this process is one rank of a job of two or more."""
    return world()[1] > 1


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every ``world_size``-th item from its rank); all of them outside a job."""
    rank, size = world()
    return list(items)[rank::size] if size > 1 else list(items)


def owner(index: int) -> int:
    """The rank that computes item ``index`` of a list split round-robin across ranks."""
    return index % world()[1]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (returns ``t``); unchanged outside a job."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """``t``'s element-wise maximum over ranks, in place (returns ``t``); unchanged outside a job."""
    if active():
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` as rank ``src`` holds it, on every rank (in place; a contiguous tensor of the same shape and
    dtype must exist on every rank); unchanged outside a job."""
    if active():
        import torch.distributed as dist

        dist.broadcast(t, src=src)
    return t
