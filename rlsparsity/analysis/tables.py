"""Tables as files people open: CSV, which the MLflow UI previews as a table."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Rows (dicts with the same keys, in column order) as CSV at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path
