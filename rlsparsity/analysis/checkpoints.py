"""Checkpoint sides for ``rlsparsity diff``: resolve, list and read safetensors weights.

A side is a local Hugging Face model directory (one ``model.safetensors``, shards listed by
``model.safetensors.index.json``, or any ``*.safetensors`` files), a single
``.safetensors`` file, a hub id downloaded with ``huggingface_hub.snapshot_download``
(safetensors and JSON files only, and only the weight files the model uses), or the same
layouts under an ``s3://`` prefix, read in place (``checkpoint_store``: headers by ranged
requests; the readers of the tensors, Ray workers under ``--ray``, fetch their ranges).

Listing reads only headers: ``safetensors.safe_open`` validates each file (a truncated or
corrupt file fails here, with its name in the error) and the header JSON gives each
tensor's byte range. Reading uses positional reads (``os.preadv``) of element ranges into
caller-owned buffers. We do not read through ``safe_open``'s memory map: every page touched
through a mapping stays in the process's resident set until the file is closed, so mapped
reads of a 5 GB shard show 5 GB of RSS; ``preadv`` keeps memory at the size of the buffers.

Pickle checkpoints (``.bin``, ``.pt``, ...) are refused: unpickling runs arbitrary code
from the file, and there is deliberately no opt-in.

Content hash (``content_hash``): every stored tensor is digested as SHA-256 over the
concatenated SHA-256 digests of its raw bytes in chunks of ``CHUNK_ELEMS`` elements, and the
checkpoint hash is SHA-256 over the sorted lines ``json([name, dtype, shape, digest])``. It
depends on the tensors only, not on how they are sharded, and parallel readers can digest
their chunks independently.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from rlsparsity.analysis.criteria_kernels import STORAGE

# The mask format's chunk size (kept in sync with rlsparsity.contracts.mask.CHUNK_ELEMS, which
# is not imported here so that listing and reading need neither pyarrow nor torch).
CHUNK_ELEMS = 1 << 20

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# safetensors dtype codes -> dtype names (torch's spelling). Other codes (e.g. packed F4)
# are listed but rejected, with a clear message, when such a tensor is compared.
DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PICKLE_EXPLAINED = (
    "rlsparsity refuses to unpickle checkpoints: loading a pickle file runs arbitrary code "
    "stored in it, and there is no opt-in. Convert the model to safetensors in an environment "
    "you trust (e.g. transformers: model.save_pretrained(DIR, safe_serialization=True)), or use "
    "a revision that has safetensors weights (on the hub, often a 'refs/pr/N' conversion)."
)


class CheckpointError(ValueError):
    """A checkpoint side cannot be resolved, listed or read (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte ``offset`` and ``nbytes`` in ``file``."""

    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def dtype_name(self) -> str:
        """torch's name of the dtype (``bfloat16``)."""
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise CheckpointError(
                f"{self.file}: tensor {self.name!r} has dtype {self.dtype}, which rlsparsity cannot compare"
            ) from None

    @property
    def storage(self) -> np.dtype:
        """numpy dtype of the stored bytes (raw bits for bf16/fp8)."""
        return STORAGE[self.dtype_name]

    @property
    def itemsize(self) -> int:
        if self.dtype in DTYPES:
            return self.storage.itemsize
        # Unknown codes can still be read (and hashed) as raw bytes if whole bytes per element.
        if self.numel and self.nbytes % self.numel == 0:
            return self.nbytes // self.numel
        raise CheckpointError(f"{self.file}: tensor {self.name!r} has dtype {self.dtype}, which rlsparsity cannot read")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorInfo:
        return TensorInfo(**{**d, "shape": tuple(d["shape"])})


@dataclass
class Checkpoint:
    """One resolved side: its files and every stored tensor (no data read)."""

    spec: str  # what the user gave (path or hub id)
    root: Path | str  # str: an s3:// prefix
    files: list[Path] | list[str]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = "local"  # "local", "hub" or "s3"
    revision: str | None = None
    commit: str | None = None

    @property
    def tie_word_embeddings(self) -> bool | None:
        """``tie_word_embeddings`` from config.json (or its ``text_config``); None if absent."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            if isinstance(cfg, dict) and "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.spec,
            "source": self.source,
            "path": str(self.root),
            "revision": self.revision,
            "commit": self.commit,
            "files": [os.path.basename(str(f)) for f in self.files],
        }


# ----------------------------------------------------------------------------- resolve


def open_checkpoint(
    spec: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    label: str = "checkpoint",
) -> Checkpoint:
    """Resolve ``spec`` (local dir/file or hub id) and list its tensors. ``label`` prefixes errors."""
    spec = str(spec)
    if spec.startswith("s3://"):
        if revision:
            raise CheckpointError(f"{label}: {spec} is in an object store; --revision applies to hub ids only")
        return _open_remote(spec, label=label)
    path = Path(spec).expanduser()
    if path.exists():
        if revision:
            raise CheckpointError(f"{label}: {spec} is a local path; --revision applies to hub ids only")
        return _open_local(path, spec=spec, label=label)
    if is_hub_id(spec):
        return _open_hub(spec, revision=revision, cache_dir=cache_dir, label=label)
    raise CheckpointError(f"{label}: {spec} is neither an existing path nor a Hugging Face hub id")


def _pickles(names: list[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))


def _refuse_pickle(label: str, where: str, pickles: list[str]) -> CheckpointError:
    shown = ", ".join(pickles[:4]) + (f", ... ({len(pickles)} files)" if len(pickles) > 4 else "")
    return CheckpointError(f"{label}: {where} has only pickle weights ({shown}). {_PICKLE_EXPLAINED}")


def _choose_weights(names: list[str], weight_map: dict[str, str] | None, where: str, label: str) -> list[str]:
    """The weight files of a model folder holding ``names``: the index's shards, else
    model.safetensors, else every *.safetensors; pickles only are refused."""
    if weight_map is not None:
        shards = list(dict.fromkeys(weight_map.values()))
        for name in shards:
            if name not in names:
                raise CheckpointError(f"{label}: {where}/{INDEX_NAME} lists shard {name}, which does not exist")
        return shards
    if SINGLE_NAME in names:
        return [SINGLE_NAME]
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if found:
        return found
    if _pickles(names):
        raise _refuse_pickle(label, where, _pickles(names))
    raise CheckpointError(f"{label}: {where} contains no *.safetensors weights")


def _weight_files(root: Path, label: str) -> list[Path]:
    index = root / INDEX_NAME
    names = [p.name for p in root.iterdir() if p.is_file()]
    return [root / n for n in _choose_weights(names, _read_index(index) if index.is_file() else None, str(root), label)]


def _read_index(index: Path) -> dict[str, str]:
    try:
        return _parse_index(json.loads(index.read_text()), str(index))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e


def _parse_index(data: Any, where: str) -> dict[str, str]:
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{where}: not a valid safetensors index (no weight_map object)")
    return {str(k): str(v) for k, v in weight_map.items()}


def _open_local(path: Path, *, spec: str, label: str, **extra: Any) -> Checkpoint:
    use_index = False
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            raise _refuse_pickle(label, str(path), [path.name])
        if path.name == INDEX_NAME:
            root, files, use_index = path.parent, _weight_files(path.parent, label), True
        elif path.suffix == ".safetensors":
            root, files = path.parent, [path]
        else:
            raise CheckpointError(f"{label}: {path} is not a .safetensors file, {INDEX_NAME} or a model directory")
    else:
        root, files = path, _weight_files(path, label)
        use_index = (root / INDEX_NAME).is_file()
    config: dict[str, Any] = {}
    cfg = root / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except ValueError as e:
            raise CheckpointError(f"{label}: {cfg} is not valid JSON ({e})") from e
    index = _read_index(root / INDEX_NAME) if use_index else None
    listed = ((str(f), list_file(f)) for f in files)
    return _assemble(spec, root, files, listed, index, config, label, **extra)


def _assemble(
    spec: str, root: Any, files: list[Any], listed: Any, index: dict[str, str] | None,
    config: dict[str, Any], label: str, **extra: Any,
) -> Checkpoint:  # fmt: skip
    """The Checkpoint of listed files ``(file, {name: TensorInfo})``: every tensor stored
    once, and where the index maps it."""
    tensors: dict[str, TensorInfo] = {}
    for f, infos in listed:
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"{label}: tensor {name!r} is stored twice, in {tensors[name].file} and {f}")
            tensors[name] = info
    for name, shard in (index or {}).items():
        if name not in tensors or os.path.basename(tensors[name].file) != shard:
            raise CheckpointError(f"{label}: {root}/{INDEX_NAME} maps {name!r} to {shard}, but {root}/{shard} does not contain it")
    return Checkpoint(spec=spec, root=root, files=files, tensors=tensors, config=config, **extra)


def hub_weight_files(repo_id: str, revision: str | None, meta_root: Path, label: str) -> list[str]:
    """The weight files of hub repo ``repo_id`` to download, given its JSON files in ``meta_root``
    (a snapshot), by the rule of a local folder (`_choose_weights`) over the repo's top-level
    files; offline, every safetensors file."""
    import huggingface_hub as hf

    if (meta_root / INDEX_NAME).is_file():
        return sorted(set(_read_index(meta_root / INDEX_NAME).values()))
    try:
        names = hf.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - offline: fall back to every safetensors file
        return ["*.safetensors"]
    top = [n for n in names if "/" not in n]
    return _choose_weights(top, None, f"hub repo {repo_id} (revision {revision or 'main'})", label)


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a hub id (``name`` or ``org/name``) rather than a path."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))


def _open_remote(uri: str, *, label: str) -> Checkpoint:
    """An s3:// model prefix, shard or index: only the headers and JSON files are read here."""
    from rlsparsity.analysis import checkpoint_store as store
    from rlsparsity.analysis.object_store import StoreError

    try:
        name = uri.rstrip("/").rpartition("/")[2]
        if name.endswith(PICKLE_SUFFIXES):
            raise _refuse_pickle(label, uri, [name])
        single = name.endswith(".safetensors")
        root = uri.rpartition("/")[0] if single or name == INDEX_NAME else uri.rstrip("/")
        names = store.list_names(root)
        if (single or name == INDEX_NAME) and name not in names:
            raise CheckpointError(f"{label}: {uri} does not exist")
        index = None
        if INDEX_NAME in names and not single:
            index = _parse_index(store.read_json(f"{root}/{INDEX_NAME}"), f"{root}/{INDEX_NAME}")
        files = [uri] if single else [f"{root}/{n}" for n in _choose_weights(names, index, root, label)]
        config = store.read_json(f"{root}/config.json") if "config.json" in names else {}
        listed = [(f, tensors_from_header(*store.read_header(f), f)) for f in files]
    except StoreError as e:
        raise CheckpointError(f"{label}: {e}") from e
    return _assemble(uri, root, files, listed, index, config, label, source="s3")


def _open_hub(repo_id: str, *, revision: str | None, cache_dir: Any, label: str) -> Checkpoint:
    import huggingface_hub as hf

    try:
        # First the JSON files only: the index tells which weight files the model uses, so
        # a repo that also ships e.g. consolidated.safetensors is not downloaded twice.
        meta_root = Path(hf.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=["*.json"]))
        wanted = hub_weight_files(repo_id, revision, meta_root, label)
        root = Path(hf.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[*wanted, "*.json"]))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; name the repo
        raise CheckpointError(f"{label}: cannot download {repo_id} (revision {revision or 'main'}) from the hub: {e}") from e
    return _open_local(root, spec=repo_id, label=label, source="hub", revision=revision, commit=root.name)


# ----------------------------------------------------------------------------- list


def list_file(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file (header only). Corrupt/truncated files raise CheckpointError."""
    path = Path(path)
    try:
        # safe_open validates the header and that the offsets cover the file exactly
        # ("numpy" so that listing does not import torch).
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (SafetensorError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    return tensors_from_header({k: header[k] for k in keys}, 8 + n, str(path))


def tensors_from_header(header: dict[str, Any], data_start: int, file: str) -> dict[str, TensorInfo]:
    """TensorInfos of a validated safetensors header (tensor entries only) of ``file``."""
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        info = TensorInfo(
            name=name, dtype=entry["dtype"], shape=tuple(int(d) for d in entry["shape"]),
            file=file, offset=data_start + int(begin), nbytes=int(end) - int(begin),
        )
        if info.dtype in DTYPES and info.nbytes != info.numel * info.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} has {info.nbytes} bytes for shape {list(info.shape)} {info.dtype}")
        out[name] = info
    return out


# ----------------------------------------------------------------------------- read


class Reader:
    """Positional reads of element ranges; one file descriptor per file, shared by threads
    (``preadv`` has no file position, so concurrent reads need no locking). An ``s3://``
    file is read with one ranged request per call, credentials from the environment."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._remote: dict[str, Any] = {}  # object_store.Source per s3:// file
        self._lock = threading.Lock()

    def _read_remote(self, info: TensorInfo, pos: int, buf: np.ndarray) -> None:
        from rlsparsity.analysis.object_store import StoreError, open_source

        try:
            with self._lock:
                src = self._remote.get(info.file)
                if src is None:
                    src = self._remote[info.file] = open_source(info.file)
            buf[:] = np.frombuffer(src.read(pos, buf.size), dtype=np.uint8)
        except StoreError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r}: {e}") from e

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    try:
                        fd = os.open(file, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{file}: cannot open: {e}") from e
                    self._fds[file] = fd
        return fd

    def read(self, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> Any:
        """Elements ``[start, start+count)`` (row-major) of ``info`` as a flat torch tensor.

        ``out`` is an optional uint8 buffer of at least ``count * itemsize`` bytes to read into;
        the returned tensor shares it.
        """
        import torch

        dtype = getattr(torch, info.dtype_name)
        buf = self.read_bytes(info, start, count, out)
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count)

    def read_bytes(self, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """The raw stored bytes of elements ``[start, start+count)`` as a uint8 array."""
        itemsize = info.itemsize
        nbytes = count * itemsize
        if start < 0 or start + count > info.numel:
            raise ValueError(f"{info.name}: range [{start}, {start + count}) outside {info.numel} elements")
        buf = np.empty(nbytes, dtype=np.uint8) if out is None else out[:nbytes]
        view = memoryview(buf)
        pos, got = info.offset + start * itemsize, 0
        if info.file.startswith("s3://"):
            self._read_remote(info, pos, buf)
            return buf
        fd = self._fd(info.file)
        while got < nbytes:
            try:
                k = os.preadv(fd, [view[got:]], pos + got)
            except OSError as e:
                raise CheckpointError(f"{info.file}: read error in tensor {info.name!r}: {e}") from e
            if k == 0:
                raise CheckpointError(f"{info.file}: unexpected end of file in tensor {info.name!r} (truncated while reading?)")
            got += k
        return buf

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for src in self._remote.values():
                src.close()
            self._remote.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
