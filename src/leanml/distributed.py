"""Data parallelism on torch.distributed, launched by ``torchrun`` (never a home-made launcher).

Training (``leanml.distill``) and calibration (``leanml.calibrate``) use the same job: gloo on CPU, NCCL
when CUDA is present. Calibration splits its windows across ranks (:func:`shard`), sums the statistics
each rank gathered (:func:`all_reduce_sum`, :func:`all_reduce_max`); rank 0 factors each shared Hessian
with every local rank's threads and sends it (:func:`broadcast`), each rank quantizes a contiguous share
of every layer's output rows (:func:`even_split`) and the shares are exchanged (:func:`all_gather_rows`),
so every rank ends with the weights one process would compute.
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


def even_split(n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's share of ``n`` items in contiguous runs whose lengths differ by at
    most one (earlier ranks take the longer runs); one run of all ``n`` outside a job."""
    size = world()[1]
    base, extra = divmod(n, size)
    bounds, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def all_gather_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``rows`` rows whose :func:`even_split` shares the ranks hold (this rank's is ``part``), stacked
    in rank order on every rank; ``part`` itself outside a job. Every rank's share is padded to the
    longest for the exchange."""
    if not active():
        return part
    import torch.distributed as dist

    bounds = even_split(rows)
    longest = max(b - a for a, b in bounds)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, bounds, strict=True)])


class all_local_threads:
    """Context manager: while one rank computes what every rank needs and the others wait for it, give
    that rank the threads of every process of the job on this machine (``LOCAL_WORLD_SIZE`` x its own, at
    most the machine's cores). Nothing changes outside a job."""

    def __enter__(self) -> all_local_threads:
        self._before = torch.get_num_threads()
        if active():
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, min(self._before * local, os.cpu_count() or 1)))
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._before)
