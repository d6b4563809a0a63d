"""One way to compile the analysis kernels with numba: cached on disk when a cache directory
is writable, in memory otherwise. (numba's cache holds compiled code only, never data.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def njit(fn: Callable[..., Any]) -> Callable[..., Any]:
    import numba

    opts = {"nogil": True, "boundscheck": False, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # no writable cache directory ("no locator available")
        return numba.njit(cache=False, **opts)(fn)
