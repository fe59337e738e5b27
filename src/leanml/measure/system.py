"""What the operating system can tell about a run: peak resident memory, RAPL energy, bandwidth."""

from __future__ import annotations

import glob
import os
import platform
import threading
import time
from contextlib import contextmanager

import psutil
import torch

from ..errors import LeanmlError


def check_threads(threads) -> None:
    """Refuse a thread count other than None or a whole number from 1 to this machine's CPU count
    (more threads than CPUs only slows a run down, and a huge count aborts inside the OpenMP runtime)."""
    if threads is None:
        return
    most = os.cpu_count() or 1
    whole = isinstance(threads, int) and not isinstance(threads, bool)
    if not whole or not 1 <= threads <= most:
        raise LeanmlError(
            f"threads {threads!r} is not accepted; give a whole number from 1 to {most} (the CPUs this machine has)"
        )


class PeakMemory:
    """Peak resident memory (bytes) of this process during a ``with`` block.

    On Linux the kernel's high-water mark (``VmHWM``) is reset on entry through ``/proc/self/clear_refs``
    and read on exit, so the figure is exact; elsewhere a thread samples the RSS every millisecond.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "rss-sampling"
            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_bytes = self._hwm() or psutil.Process().memory_info().rss


def rapl_paths() -> list[str]:
    """Readable package-level RAPL energy counters (``intel-rapl:N/energy_uj``)."""
    paths = []
    for path in sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]*/energy_uj")):
        if path.count(":") == 1 and os.access(path, os.R_OK):
            paths.append(path)
    return paths


class RaplMeter:
    """Joules used by the CPU packages during a ``with`` block, or ``None`` when RAPL is unreadable."""

    def __init__(self) -> None:
        self.paths = rapl_paths()
        self.joules: float | None = None

    def _read(self) -> list[tuple[int, int]]:
        out = []
        for path in self.paths:
            with open(path) as fh:
                value = int(fh.read())
            with open(path.replace("energy_uj", "max_energy_range_uj")) as fh:
                limit = int(fh.read())
            out.append((value, limit))
        return out

    def __enter__(self) -> RaplMeter:
        self._start = self._read() if self.paths else []
        return self

    def __exit__(self, *exc) -> None:
        if not self.paths:
            return
        total = 0
        for (a, limit), (b, _) in zip(self._start, self._read(), strict=True):
            total += b - a if b >= a else b + limit - a  # the counter wraps at max_energy_range_uj
        self.joules = total / 1e6


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured streaming read bandwidth (GB/s of bytes read), best of ``repeats`` passes.

    A decode step reads every weight once and writes almost nothing, so the roofline divides this by
    the bytes read per token. Each pass sums a ``megabytes`` buffer (far larger than the caches; its
    pages are touched before timing) with the threads in use; a copy would count its writes too."""
    n = megabytes * 1024 * 1024 // 4
    buf = torch.ones(n, dtype=torch.float32)
    float(buf.sum())  # warm: page tables, thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
