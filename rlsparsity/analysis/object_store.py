"""Ranged reads of artifacts where they live: a local path, an S3 object (``s3://``), or a
file proxied by an MLflow tracking server (``http(s)://…/mlflow-artifacts/artifacts/…``).

Ray tasks open their own sources from a location string, so nothing but the location
travels in a task's arguments. Endpoint and credentials come from each process's
environment, as MLflow and boto3 read them: ``MLFLOW_S3_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``; an MLflow server's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``.
On a multi-node cluster they must be in every worker's environment (the pod's env, or
the job's ``runtime_env``).

Every remote read goes through ``Source.read``, which counts requests and bytes; the
overlap job reports those counts.
"""

from __future__ import annotations

import bisect
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa

S3_SCHEME = "s3://"
HTTP_SCHEMES = ("http://", "https://")
# Seconds; pyarrow's defaults wait on an unreachable endpoint far longer than a user would.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0


class StoreError(OSError):
    """An artifact location cannot be opened or read (the message names it and the store)."""


class RangeNotSupported(StoreError):
    """The server answers a ranged read with the whole file (MLflow 3.17's artifact proxy
    does when its own store is remote: it streams the object it downloaded)."""


def is_remote(location: str) -> bool:
    return location.startswith((S3_SCHEME, *HTTP_SCHEMES))


def local_path(location: str) -> str:
    """A local location as a path (``file://`` URIs unwrapped)."""
    return unquote(urlsplit(location).path) if location.startswith("file://") else location


@dataclass
class Source:
    """One artifact opened for random access. ``identity`` describes the version seen when
    it was opened (local: stat fields; S3: ETag, size, Last-Modified; server: size only).
    ``stable`` says whether that identity pins the content, so that a memo of verified
    content may trust it later (an MLflow server re-downloads the file for every request,
    so its ETag and dates change each time, and only its size is kept)."""

    location: str
    size: int
    identity: dict[str, Any]
    stable: bool
    _file: pa.NativeFile
    _whole: pa.Buffer | None = None  # a local file's map as one zero-copy buffer
    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def native(self) -> pa.NativeFile:
        """The underlying random-access file (local: a memory map, zero-copy slices)."""
        return self._file

    def read(self, offset: int, nbytes: int) -> pa.Buffer:
        """Bytes [offset, offset + nbytes): one ranged request for a remote source.
        Thread-safe (S3 and local reads are positional; the HTTP file is locked)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise StoreError(
                f"{self.location}: read of bytes [{offset}, {offset + nbytes}) outside its "
                f"{self.size} bytes (it changed since it was opened?)"
            )
        if nbytes == 0:
            return pa.py_buffer(b"")
        if self._whole is not None:
            return self._whole.slice(offset, nbytes)
        try:
            if self.location.startswith(HTTP_SCHEMES):
                with self._lock:  # a PythonFile over fsspec seeks, then reads
                    data = self._file.read_at(nbytes, offset)
            else:
                data = self._file.read_at(nbytes, offset)
        except ValueError as e:  # fsspec: a 200 with the whole file for a Range request
            raise RangeNotSupported(
                f"{self.location}: the server does not answer Range requests ({e})"
            ) from e
        except OSError as e:
            raise StoreError(f"reading bytes [{offset}, {offset + nbytes}) of {self.location}{_where(self.location)}: {e}") from e
        if len(data) != nbytes:
            raise StoreError(f"{self.location}: got {len(data)} of {nbytes} bytes at {offset} (truncated or changed?)")
        with self._lock:
            self.requests += 1
            self.bytes += nbytes
        return pa.py_buffer(data)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(location: str) -> Source:
    """Open ``location`` (a path, ``file://``, ``s3://`` or an ``http(s)://`` artifact URL)."""
    if location.startswith(S3_SCHEME):
        return _open_s3(location)
    if location.startswith(HTTP_SCHEMES):
        return _open_http(location)
    path = local_path(location)
    try:
        st = os.stat(path)
        mm = pa.memory_map(path)
    except FileNotFoundError as e:
        raise StoreError(f"{path}: no such file") from e
    except OSError as e:
        raise StoreError(f"{path}: cannot open: {e}") from e
    # read_at would copy into a bytes object; slices of the whole map do not.
    return Source(location, mm.size(), file_identity(st), True, mm, _whole=mm.read_buffer())


def supports_ranges(location: str) -> bool:
    """Whether ranged reads of ``location`` work (one small read of its end)."""
    with open_source(location) as src:
        try:
            src.read(max(0, src.size - 16), min(16, src.size))
        except RangeNotSupported:
            return False
    return True


def file_identity(st: os.stat_result) -> dict[str, Any]:
    # ctime too: unlike mtime it cannot be set back with utime() after an edit in place.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}  # fmt: skip


def identity_of(location: str) -> dict[str, Any]:
    """The location's current identity (a stat, or one HEAD request)."""
    if not is_remote(location):
        try:
            return file_identity(os.stat(local_path(location)))
        except OSError as e:
            raise StoreError(f"{local_path(location)}: cannot stat: {e}") from e
    with open_source(location) as src:
        return src.identity


# ----------------------------------------------------------------------------- S3


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise StoreError(f"{uri}: not an s3://BUCKET/KEY URI")
    return bucket, key


def s3_endpoint() -> str | None:
    """The S3 endpoint as MLflow and boto3 read it (None: AWS's own)."""
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _where(location: str) -> str:
    if location.startswith(S3_SCHEME):
        return f" (S3 endpoint {s3_endpoint() or 'AWS'})"
    return ""


_FS_LOCK = threading.Lock()
_S3: dict[tuple, Any] = {}


def s3_filesystem() -> Any:
    """A pyarrow S3FileSystem configured from this process's environment (one per config)."""
    from pyarrow import fs as pafs

    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    keyed = bool(os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if endpoint and not keyed and not _other_credentials():
        # An S3-compatible server needs keys; without them pyarrow would try EC2's instance
        # metadata and fail much later with a vaguer message.
        raise StoreError(
            f"reading from the S3-compatible store at {endpoint} needs AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the environment (as MLflow and boto3 expect); on a "
            "cluster, in every Ray worker's environment"
        )
    # The secret is in the key only as a hash, so a changed environment gets a new client.
    key = (endpoint, region, hash(os.environ.get("AWS_SECRET_ACCESS_KEY")), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _FS_LOCK:
        fs = _S3.get(key)
        if fs is None:
            kwargs: dict[str, Any] = {}
            if endpoint:
                u = urlsplit(endpoint)
                kwargs.update(endpoint_override=u.netloc + u.path.rstrip("/"), scheme=u.scheme or "https")
            fs = _S3[key] = pafs.S3FileSystem(
                region=region or ("us-east-1" if endpoint else None),
                connect_timeout=CONNECT_TIMEOUT_S,
                request_timeout=REQUEST_TIMEOUT_S,
                **kwargs,
            )
        return fs


def _other_credentials() -> bool:
    return bool(
        os.environ.get("AWS_PROFILE")
        or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        or Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials")).is_file()
    )


def _open_s3(uri: str) -> Source:
    bucket, key = split_s3(uri)
    fs = s3_filesystem()
    try:
        f = fs.open_input_file(f"{bucket}/{key}")  # one HEAD: size, ETag, Last-Modified
        meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (f.metadata() or {}).items()}
        size = f.size()
    except FileNotFoundError as e:
        raise StoreError(f"{uri}: no such object{_where(uri)}") from e
    except OSError as e:
        raise StoreError(f"cannot open {uri}{_where(uri)}: {e}") from e
    identity = {"size": size, "etag": meta.get("ETag"), "last_modified": meta.get("Last-Modified")}
    return Source(uri, size, identity, bool(identity["etag"]), f)


# ----------------------------------------------------------------------------- HTTP


def http_filesystem() -> Any:
    """fsspec's HTTP filesystem with the MLflow server's auth from the environment."""
    import fsspec

    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    client: dict[str, Any] = {}
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        import aiohttp

        client["auth"] = aiohttp.BasicAuth(
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        )
    return fsspec.filesystem("http", headers=headers, client_kwargs=client, skip_instance_cache=True)


def _open_http(url: str) -> Source:
    fs = http_filesystem()
    try:
        info = fs.info(url)
        size = info.get("size")
        if size is None:
            raise StoreError(f"{url}: the server does not report the artifact's size")
        # cache_type "none": every read is exactly one Range request (fsspec refuses a
        # server that answers a Range request with the whole file).
        f = pa.PythonFile(fs.open(url, "rb", cache_type="none", size=size), mode="r")
    except FileNotFoundError as e:
        raise StoreError(f"{url}: no such artifact on the MLflow server") from e
    except (OSError, ValueError) as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"cannot open {url} through the MLflow server: {e}") from e
    return Source(url, int(size), {"size": int(size)}, False, f)


# ----------------------------------------------------------------------------- ranges


FETCH_THREADS = 16
_POOL: ThreadPoolExecutor | None = None


def fetch_pool() -> ThreadPoolExecutor:
    """One pool of I/O threads per process (requests wait on the network, not the CPU).
    Only ``Source.read`` runs on it, which never waits on the pool itself."""
    global _POOL
    with _FS_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="rls-fetch")
        return _POOL


def coalesce(ranges: list[tuple[int, int]], hole: int, limit: int) -> list[tuple[int, int]]:
    """(start, length) ranges sorted and merged where the gap between two is at most
    ``hole`` bytes and the merged range stays within ``limit`` bytes (one request each)."""
    out: list[list[int]] = []
    for start, n in sorted(r for r in ranges if r[1] > 0):
        if out and start - (out[-1][0] + out[-1][1]) <= hole and start + n - out[-1][0] <= limit:
            out[-1][1] = max(out[-1][1], start + n - out[-1][0])
        else:
            out.append([start, n])
    return [(s, n) for s, n in out]


class RangeCache(io.RawIOBase):
    """A read-only file over a Source that serves reads from ranges fetched ahead
    (``fetch``, concurrently) and reads anything else through. Wrapped in
    ``pa.PythonFile`` it lets pyarrow parse a remote file from a few large requests
    instead of one small request per buffer."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self._starts: list[int] = []
        self._bufs: list[pa.Buffer] = []
        self._pos = 0
        self.misses = 0

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        """Read ``ranges`` (start, length) concurrently and keep them."""
        todo = [r for r in ranges if r[1] > 0 and self._find(*r) is None]
        if len(todo) > 1:
            got = list(fetch_pool().map(lambda r: self.source.read(*r), todo))
        else:
            got = [self.source.read(*r) for r in todo]
        pairs = sorted([*zip(self._starts, self._bufs, strict=True), *((s, b) for (s, _), b in zip(todo, got, strict=True))],
                       key=lambda p: p[0])  # fmt: skip
        self._starts = [s for s, _ in pairs]
        self._bufs = [b for _, b in pairs]

    def _find(self, offset: int, nbytes: int) -> pa.Buffer | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        # Ranges may overlap; look back a few for one that holds the whole read.
        for j in range(i, max(-1, i - 4), -1):
            s, b = self._starts[j], self._bufs[j]
            if s <= offset and offset + nbytes <= s + b.size:
                return b.slice(offset - s, nbytes)
        return None

    def read_range(self, offset: int, nbytes: int) -> pa.Buffer:
        hit = self._find(offset, nbytes)
        if hit is not None:
            return hit
        self.misses += 1
        return self.source.read(offset, nbytes)

    # io.RawIOBase, for pa.PythonFile
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.source.size}[whence]
        self._pos = base + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self.source.size - self._pos if n is None or n < 0 else min(n, self.source.size - self._pos)
        data = self.read_range(self._pos, max(n, 0)).to_pybytes()
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)
