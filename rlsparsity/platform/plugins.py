"""Plugins: modules that register algorithms, tasks, rewards or batch sources on import.

A sweep's `plugins` are imported in every process that validates or runs one of its
trials: the driver (before the spec is validated), the Ray Tune trial and each Ray Train
learner worker. The driver resolves where each module was found, so a worker on the same
machine can import a module the driver found through its own `sys.path` (a notebook's
directory, `PYTHONPATH`), and `ray job submit --working-dir` uploads work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class PluginError(ValueError):
    """A plugin module is malformed or cannot be imported; the message names it."""


def check_names(modules: object) -> list[str]:
    """`modules` as a list of dotted module names, or PluginError naming the bad entry."""
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list | tuple):
        raise PluginError(f"plugins: expected a list of module names, got {type(modules).__name__}")
    names = []
    for i, m in enumerate(modules):
        if not isinstance(m, str) or not _MODULE.fullmatch(m):
            raise PluginError(f"plugins[{i}]: {m!r} is not a dotted Python module name (e.g. my_pkg.my_algos)")
        names.append(m)
    return names


def import_plugins(modules: Iterable[str], search_paths: Sequence[str] = ()) -> None:
    """Import each module (registering what it defines). `search_paths` (from
    `search_paths_of` in the driver) are appended to `sys.path` first, where they exist."""
    for p in search_paths:
        if p not in sys.path and Path(p).is_dir():
            sys.path.append(p)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import-time failure is the plugin's
            raise PluginError(f"plugins: cannot import module {name!r} ({type(e).__name__}: {e})") from e


def search_paths_of(modules: Iterable[str]) -> list[str]:
    """The `sys.path` entries the (imported) modules were found under, for other processes."""
    paths: list[str] = []
    for name in modules:
        spec = importlib.util.find_spec(name.split(".", 1)[0])
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        origin = Path(spec.origin).resolve()
        root = origin.parent.parent if spec.submodule_search_locations else origin.parent
        if str(root) not in paths:
            paths.append(str(root))
    return paths
