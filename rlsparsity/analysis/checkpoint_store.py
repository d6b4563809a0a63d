"""Safetensors checkpoints in an S3 store, for ``rlsparsity diff``: which objects a model
prefix holds, small JSON files, and each shard's header, read with two ranged requests.
The tensors' bytes are read later by whoever diffs them (``checkpoints.Reader``), a Ray
worker under ``--ray``, never through the driver.

A shard's header is checked as ``safetensors.safe_open`` checks a local file: JSON with a
dtype, a shape and data offsets per tensor, the offsets covering the data exactly, without
gaps or overlaps."""

from __future__ import annotations

import json
import struct
from typing import Any

from rlsparsity.analysis.object_store import StoreError, open_source, s3_filesystem, split_s3

MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size
MAX_JSON = 64 << 20  # config.json and the shard index


def list_names(prefix: str) -> list[str]:
    """Names of the objects directly under ``s3://bucket/prefix/`` (no recursion)."""
    from pyarrow import fs as pafs

    bucket, key = split_s3(prefix.rstrip("/") + "/")
    try:
        infos = s3_filesystem().get_file_info(pafs.FileSelector(f"{bucket}/{key.rstrip('/')}", recursive=False))
    except FileNotFoundError as e:
        raise StoreError(f"{prefix}: no such prefix in the object store") from e
    except OSError as e:
        raise StoreError(f"cannot list {prefix}: {e}") from e
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def read_json(uri: str) -> Any:
    with open_source(uri) as src:
        if src.size > MAX_JSON:
            raise StoreError(f"{uri}: {src.size} bytes, too large for a JSON file of a model")
        raw = src.read(0, src.size).to_pybytes()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise StoreError(f"{uri}: not valid JSON ({e})") from e


def read_header(uri: str) -> tuple[dict[str, Any], int]:
    """A shard's header (tensor entries only) and the offset where its data starts."""
    with open_source(uri) as src:
        if src.size < 8:
            raise StoreError(f"{uri}: not a valid safetensors file ({src.size} bytes)")
        (n,) = struct.unpack("<Q", src.read(0, 8).to_pybytes())
        if n > MAX_HEADER or 8 + n > src.size:
            raise StoreError(f"{uri}: not a valid safetensors file (header length {n}, file {src.size} bytes)")
        try:
            header = json.loads(src.read(8, n).to_pybytes())
        except ValueError as e:
            raise StoreError(f"{uri}: not a valid safetensors file (header is not JSON: {e})") from e
        size = src.size
    if not isinstance(header, dict):
        raise StoreError(f"{uri}: not a valid safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    _check_coverage(uri, header, size - 8 - n)
    return header, 8 + n


def _check_coverage(uri: str, header: dict[str, Any], data_len: int) -> None:
    spans = []
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            str(entry["dtype"])
            [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{uri}: tensor {name!r} has a malformed header entry ({e})") from e
        if not 0 <= begin <= end:
            raise StoreError(f"{uri}: tensor {name!r} has data offsets [{begin}, {end})")
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise StoreError(f"{uri}: tensor {name!r} starts at {begin}, expected {at} (gap or overlap)")
        at = end
    if at != data_len:
        raise StoreError(f"{uri}: tensors cover {at} bytes of data, the file holds {data_len} (truncated?)")
