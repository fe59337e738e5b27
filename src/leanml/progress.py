"""Progress bars for long loops (rich), quiet when ``LEANML_QUIET=1`` or output is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("LEANML_QUIET") != "1" and sys.stderr.isatty()


def progress(items: Iterable[T], label: str, total: int | None = None, status: Callable[[], str] | None = None) -> Iterator[T]:
    """Iterate over ``items`` showing a progress bar on stderr; ``status()`` (e.g. the memory in use) is
    shown beside it, refreshed after each item."""
    if not enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    if status is not None:
        columns = (*columns, TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, status=status() if status else "")
        for item in items:
            yield item
            bar.update(task, advance=1, status=status() if status else "")


def memory_status() -> str:
    """This process's resident memory, for a progress bar's status."""
    import psutil

    return f"RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB"


class StepBar:
    """A progress bar for a training loop that also shows a status text (loss, throughput); silent
    under the same conditions as :func:`progress`. Use as a context manager."""

    def __init__(self, label: str, total: int, completed: int = 0):
        self.label, self.total, self.completed = label, total, completed
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> StepBar:
        if enabled():
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._bar = Progress(*columns, transient=True, console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.completed, status="")
        return self

    def advance(self, status: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, status=status)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
