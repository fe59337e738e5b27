"""The resident memory of a run, and ``--max-memory`` as a cap on it.

:class:`MemoryCap` reads the process's peak resident memory as the kernel records it (``VmHWM`` in
``/proc/self/status``, reset when the cap starts by writing ``5`` to ``/proc/self/clear_refs``), so a
spike between two checks is not missed the way sampling would miss it. Where that is not available
(not Linux, an old kernel) the peak is the largest resident size seen at the checks. A run calls
:meth:`MemoryCap.check` at its safe points (after each block of a layer-by-layer run): past the limit it
stops with a one-line error naming the peak, the limit and where it was.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LeanmlError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _kernel_peak() -> int | None:
    """``VmHWM`` of this process in bytes, or None where the kernel does not give it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_kernel_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class MemoryCap:
    """The peak resident memory of this process from now on, and an optional ``limit`` (bytes) on it.

    ``with MemoryCap(limit) as cap: ... cap.check("block 3") ...``; ``cap.peak()`` is the peak so far.
    ``limit`` None measures only. In a ``torchrun`` job each process is held to its share of the limit
    (the limit divided by the processes on this machine)."""

    def __init__(self, limit: float | None = None, what: str = "--max-memory"):
        import os

        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        self.total = limit
        self.limit = None if limit is None else float(limit) / local
        self.local = local
        self.what = what
        self.kernel = False
        self.seen = 0

    def __enter__(self) -> MemoryCap:
        self.kernel = _reset_kernel_peak() and _kernel_peak() is not None
        self.seen = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak(self) -> int:
        self.seen = max(self.seen, rss_bytes())
        if self.kernel:
            k = _kernel_peak()
            if k is not None:
                self.seen = max(self.seen, k)
        return self.seen

    def check(self, where: str) -> int:
        """The peak so far; a one-line error when it is past the limit."""
        peak = self.peak()
        if self.limit is not None and peak > self.limit:
            share = (
                f" (this process's share of {self.total / 2**30:.2f} GiB over {self.local} processes)" if self.local > 1 else ""
            )
            raise LeanmlError(
                f"resident memory reached {peak / 2**30:.2f} GiB by {where}, over {self.what} {self.limit / 2**30:.2f} GiB"
                f"{share}; the run was stopped and nothing was written: raise {self.what}, or use fewer calibration "
                "windows or a data-free method (rtn)"
            )
        return peak
