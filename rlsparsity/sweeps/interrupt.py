"""SIGINT and SIGTERM during a sweep: stop the grid, end every MLflow run KILLED, say how to resume.

Ray Tune's own SIGINT handler ends the tuning loop and prints "Resume experiment with:
Tuner.restore(...)", which is not our command, and leaves the trials' MLflow runs RUNNING
for good (Tune stops the trial actors; their clean-up may never run). So the sweep owns the
two signals while its grid runs: the first raises `Interrupted` in the driver, Tune's loop
cleans its trials up on the way out, and the sweep marks what was left RUNNING KILLED. A
second signal gets the default behaviour (stop now).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class Interrupted(Exception):  # noqa: N818 - an event, not an error; Exception so Tune cleans up
    """The sweep's driver got SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def interrupt_in(error: BaseException) -> Interrupted | None:
    """The `Interrupted` that caused `error`, if one did. Raised inside Ray's Cython code
    (`ray.wait` in Tune's loop), it comes out as a SystemError whose cause it is."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises `Interrupted` in the main thread.

    Outside the main thread (signals cannot be caught there) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_env = os.environ.get(TUNE_SIGINT_ENV)

    def handler(signum: int, frame: object) -> None:
        for s, h in previous.items():  # a second signal: the default behaviour
            signal.signal(s, h)
        raise Interrupted(signum)

    os.environ[TUNE_SIGINT_ENV] = "1"
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if previous_env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = previous_env
