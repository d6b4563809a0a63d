"""Small execution helpers shared by the analysis engines: an ordered, bounded map and a
byte progress bar.

``windowed`` keeps at most ``window`` submitted items in flight and yields their results in
input order, submitting the next item only when the oldest result has been taken; the
consumer's pace therefore bounds memory. ``bounded_map`` is ``windowed`` on a thread pool
(the diff's units and the rank's matrices release the GIL in numpy, preadv and LAPACK);
Ray callers pass their own ``submit``/``result`` (``remote.remote``, ``ray.get``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")
H = TypeVar("H")
R = TypeVar("R")

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


def windowed(
    submit: Callable[[T], H],
    items: Iterable[T],
    window: int,
    result: Callable[[H], R],
    cancel: Callable[[H], Any] | None = None,
) -> Iterator[R]:
    """``result(submit(x))`` for each item, in order, with at most ``window`` submitted and
    not yet yielded. ``items`` is consumed lazily, in the caller's thread. When the
    generator is closed early, ``cancel`` (if given) is called on every pending handle."""
    it = iter(items)
    pending = deque(submit(x) for x in islice(it, window))
    try:
        while pending:
            res = result(pending.popleft())
            for x in islice(it, 1):
                pending.append(submit(x))
            yield res
    finally:
        if cancel is not None:
            for h in pending:
                cancel(h)


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    window: int,
    *,
    name: str = "rlsparsity",
) -> Iterator[R]:
    """``map(fn, items)`` on a pool of ``workers`` threads, yielding in order with at most
    ``window`` items in flight (see :func:`windowed`). ``workers <= 1`` runs ``fn`` in the
    calling thread. ``name`` prefixes the threads' names."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as ex:

        def submit(x: T) -> Future[R]:
            return ex.submit(fn, x)

        yield from windowed(submit, items, window, Future.result, Future.cancel)


@contextmanager
def byte_progress(
    progress: bool | ProgressFn | None,
    total: int,
    title: str,
    *,
    console: Any = None,
    transient: bool = False,
    binary_units: bool = False,
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)`` for work measured in bytes.

    ``progress`` True: a rich bar (bytes, throughput, time left) on ``console`` (default:
    a new stderr console), removed at the end when ``transient``. A callable: called with
    (bytes done so far, ``total``) on every advance. False/None: ``advance`` does nothing.
    rich is imported only for the bar.
    """
    if progress is True:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(binary_units=binary_units),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=transient,
        ) as bar:
            task = bar.add_task(title, total=total)
            yield lambda nbytes: bar.advance(task, nbytes)
    elif callable(progress):
        cb = progress
        done = 0

        def advance(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            cb(done, total)

        yield advance
    else:
        yield lambda nbytes: None
