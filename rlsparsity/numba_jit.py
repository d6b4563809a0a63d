"""One way to compile the numba kernels (diff counts, overlap, the sync diff): cached on disk
when a cache directory is writable, in memory otherwise (numba's cache holds compiled code
only, never data), and one fallback rule for all of them (`compiled`)."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def njit(fn: Callable[..., Any]) -> Callable[..., Any]:
    import numba

    opts = {"nogil": True, "boundscheck": False, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # no writable cache directory ("no locator available")
        return numba.njit(cache=False, **opts)(fn)


_OFF = ("0", "false", "no", "off")
_COMPILED: dict[str, Any] = {}  # what -> kernels, or None once unavailable
_lock = threading.Lock()


def _turned_off() -> bool:
    return os.environ.get("RLSPARSITY_NUMBA", "1").strip().lower() in _OFF


def known_unavailable(what: str) -> bool:
    """Whether ``what``'s kernels are off or failed to compile, without importing numba."""
    return _turned_off() or (what in _COMPILED and _COMPILED[what] is None)


def compiled(what: str, build: Callable[[], T]) -> T | None:
    """``build()``'s kernels, compiled once per process, or None when numba is missing, turned
    off (``RLSPARSITY_NUMBA=0``) or fails to compile; callers then take their torch/numpy path.
    ``build`` should call its kernels once on tiny inputs so that failures surface here."""
    if what in _COMPILED:
        return _COMPILED[what]
    with _lock:  # worker threads may all ask at once
        if what not in _COMPILED:
            kernels = None
            if not _turned_off():
                try:
                    kernels = build()
                except ImportError:
                    pass
                except Exception as e:  # an LLVM/numba failure
                    warnings.warn(f"numba {what} kernel unavailable ({e}); using the fallback", stacklevel=3)
            _COMPILED[what] = kernels
    return _COMPILED[what]


_BITCASTS: tuple[Any, Any] | None = None


def bitcasts() -> tuple[Any, Any]:
    """numba intrinsics for bit patterns, made once: ``u16_to_f32`` (bf16 bits, uint16 ->
    the float32 value: a 16-bit shift and a bitcast) and ``f32_to_u32`` (float32 -> its bits)."""
    global _BITCASTS
    if _BITCASTS is None:
        from numba import types
        from numba.extending import intrinsic

        @intrinsic
        def u16_to_f32(typingctx, x):  # noqa: ARG001
            def codegen(context, builder, signature, args):  # noqa: ARG001
                wide = builder.shl(builder.zext(args[0], context.get_value_type(types.uint32)),
                                   context.get_constant(types.uint32, 16))
                return builder.bitcast(wide, context.get_value_type(types.float32))

            return types.float32(types.uint16), codegen

        @intrinsic
        def f32_to_u32(typingctx, x):  # noqa: ARG001
            def codegen(context, builder, signature, args):  # noqa: ARG001
                return builder.bitcast(args[0], context.get_value_type(types.uint32))

            return types.uint32(types.float32), codegen

        _BITCASTS = (u16_to_f32, f32_to_u32)
    return _BITCASTS
