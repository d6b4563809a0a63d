"""matplotlib for files only (the Agg backend: no display on clusters and CI), in one place
every figure of the package imports, so plotting pulls in nothing else."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
