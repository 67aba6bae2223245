"""Small file helpers used across rat_jax: content hashes and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading
from typing import Any


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (sorted keys; other objects by str())."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def temp_path(path: str | os.PathLike, suffix: str = ".tmp") -> str:
    """A temporary name beside `path`, unique to this process and thread (jobs running side by
    side may write the same file; each writes its own and renames it over `path`)."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}{suffix}"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write `data` to `path` through a temporary file and a rename: a reader (or a resume after a
    kill) sees the old file or the new one, never half of one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1,
                      sort_keys: bool = False) -> pathlib.Path:
    """JSON-encode `obj` (non-JSON values by str()) and write it atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))
