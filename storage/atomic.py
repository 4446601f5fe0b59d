"""Atomic, URL-aware file writes and the output-root lock (decision 6).

Everything is a URL (decision 7): local paths and any fsspec URL go through the same calls.
Locally a write goes to a hidden temp name in the same folder and is renamed over the final
name, so a killed process never leaves a half file under a final name. Object stores commit a
PUT whole, which gives the same guarantee.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = ".tmp-"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or a local path."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole file."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{target.name}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    else:
        fs.pipe_file(path, data)


@contextmanager
def atomic_local_path(url: str) -> Iterator[Path]:
    """Yield a local temp path to write; on success it becomes `url` (uploaded if remote)."""
    fs, path = filesystem(url)
    local = isinstance(fs, LocalFileSystem)
    parent = Path(path).parent if local else Path(os.environ.get("TMPDIR", "/tmp"))
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{Path(path).name}"
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(str(tmp), path)
    finally:
        tmp.unlink(missing_ok=True)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
    fs, path = filesystem(url)
    return fs.open(path, mode, block_size=max(bufsize, 1 << 22))


def webdataset_urls() -> None:
    """Let webdataset open every fsspec URL it has no handler of its own for (s3://, az://, …):
    webdataset 1.0 knows only files, pipes and curl/gsutil-style schemes."""
    from webdataset.gopen import gopen_schemes

    for proto in fsspec.available_protocols():
        if proto not in gopen_schemes and proto not in ("file", "local"):
            gopen_schemes[proto] = _gopen_fsspec


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
