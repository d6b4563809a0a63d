"""The progress report of ``compute_overlap``: a rich bar with throughput, a callback, or nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


class _progress:
    """Context manager yielding ``advance(nbytes)``: a rich bar with throughput, a callback, or nothing."""

    def __init__(self, progress: bool | ProgressFn, total: int, title: str) -> None:
        self.progress, self.total, self.title = progress, total, title
        self.done = 0
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            task = self._bar.add_task(self.title, total=self.total)

            def advance(nbytes: int) -> None:
                self._bar.advance(task, nbytes)

            return advance
        if callable(self.progress):
            cb = self.progress

            def advance(nbytes: int) -> None:
                self.done += nbytes
                cb(self.done, self.total)

            return advance
        return lambda nbytes: None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
