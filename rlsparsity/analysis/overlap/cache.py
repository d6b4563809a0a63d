"""The incremental cache: per-tensor results keyed by mask checksums, as Arrow files (no
pickle), and the memo of files whose checksum has been verified."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


def default_cache_dir() -> Path:
    env = os.environ.get("RLSPARSITY_OVERLAP_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rlsparsity" / "overlap"


class OverlapCache:
    """Pair results keyed by mask checksums, as append-only Arrow files (no pickle).

    ``<dir>/<base key>/`` holds ``layout-<hash>.json`` (tensor names and sizes),
    ``runs-*.arrow`` (checksum -> per-tensor changed counts) and ``pairs-*.arrow``
    (checksum pair -> per-tensor intersections). Writers add new files atomically, so
    concurrent analyses never corrupt each other. ``verified.json`` remembers which
    files (by path, size, mtime, ctime, inode, device) and which S3 objects (by URI, ETag,
    size, Last-Modified) have had their bits verified against their checksum; results are
    keyed by checksums only once the files were verified.
    """

    COMPACT_AT = 32

    def __init__(self, root: str | os.PathLike, base_key: str) -> None:
        self.root = Path(root)
        self.dir = self.root / base_key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runs: dict[str, tuple[str, np.ndarray]] = {}
        self.pairs: dict[tuple[str, str], np.ndarray] = {}
        for f in sorted(self.dir.glob("runs-*.arrow")):
            for c, lay, ch in _read_arrow_rows(f, ("checksum", "layout", "changed")):
                self.runs[c] = (lay, np.asarray(ch, dtype=np.int64))
        for f in sorted(self.dir.glob("pairs-*.arrow")):
            for a, b, lay, x in _read_arrow_rows(f, ("a", "b", "layout", "inter")):
                self.pairs[(a, b, lay)] = np.asarray(x, dtype=np.int64)  # type: ignore[index]

    @staticmethod
    def key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def get_pair(self, a: str, b: str, layout: str) -> np.ndarray | None:
        return self.pairs.get((*self.key(a, b), layout))  # type: ignore[arg-type]

    def layout(self, layout_hash: str) -> dict[str, Any] | None:
        p = self.dir / f"layout-{layout_hash}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save(
        self,
        layout_hash: str,
        names: list[str],
        numel: np.ndarray,
        runs: dict[str, np.ndarray],
        pairs: dict[tuple[str, str], np.ndarray],
    ) -> None:
        lp = self.dir / f"layout-{layout_hash}.json"
        if not lp.exists():
            _atomic_write(lp, json.dumps({"tensors": names, "numel": numel.tolist()}).encode())
        new_runs = {c: v for c, v in runs.items() if c not in self.runs}
        new_pairs = {
            self.key(*k): v
            for k, v in pairs.items()
            if (*self.key(*k), layout_hash) not in self.pairs
        }
        if new_runs:
            _write_arrow(
                self.dir / f"runs-{_stamp()}.arrow",
                {
                    "checksum": list(new_runs),
                    "layout": [layout_hash] * len(new_runs),
                    "changed": [v.tolist() for v in new_runs.values()],
                },
            )
            self.runs.update({c: (layout_hash, v) for c, v in new_runs.items()})
        if new_pairs:
            _write_arrow(
                self.dir / f"pairs-{_stamp()}.arrow",
                {
                    "a": [k[0] for k in new_pairs],
                    "b": [k[1] for k in new_pairs],
                    "layout": [layout_hash] * len(new_pairs),
                    "inter": [v.tolist() for v in new_pairs.values()],
                },
            )
            self.pairs.update({(*k, layout_hash): v for k, v in new_pairs.items()})  # type: ignore[misc]
        self._compact()

    def _compact(self) -> None:
        # Many small files make loading slow; merge them once there are enough.
        for kind, cols in (
            ("runs", ("checksum", "layout", "changed")),
            ("pairs", ("a", "b", "layout", "inter")),
        ):
            files = sorted(self.dir.glob(f"{kind}-*.arrow"))
            if len(files) < self.COMPACT_AT:
                continue
            tables = []
            for f in files:
                try:
                    with pa.memory_map(str(f)) as src:
                        tables.append(pa.ipc.open_file(src).read_all().select(list(cols)))
                except (OSError, pa.ArrowInvalid):
                    continue
            _write_arrow(
                self.dir / f"{kind}-{_stamp()}.arrow", pa.concat_tables(tables).to_pydict()
            )
            for f in files:
                f.unlink(missing_ok=True)

    # -- verification memo
    def _verified_path(self) -> Path:
        return self.root / "verified.json"

    def verified(self) -> dict[str, Any]:
        try:
            return json.loads(self._verified_path().read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def mark_verified(self, entries: dict[str, dict[str, Any]]) -> None:
        if not entries:
            return
        data = self.verified()
        data.update(entries)
        _atomic_write(self._verified_path(), json.dumps(data).encode())


def _stamp() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_arrow(path: Path, cols: dict[str, list]) -> None:
    table = pa.table(cols)
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, path)


def _read_arrow_rows(path: Path, cols: tuple[str, ...]) -> list[tuple]:
    try:
        with pa.memory_map(str(path)) as src:
            t = pa.ipc.open_file(src).read_all()
        return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))
    except (OSError, pa.ArrowInvalid, KeyError):
        return []  # a file removed by a concurrent compaction, or foreign: ignore
