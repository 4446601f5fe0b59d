"""Ingest: fetch a source (local path, http(s), any fsspec URL), hash it, probe it.

The content hash (sha256 of the bytes, streamed) is what every cache key starts from. It is
remembered per video with the source's size and modification stamp, so a re-run that finds the
source unchanged neither re-reads nor re-downloads it; a remote file is only fetched into the
local media cache when some stage actually has work to do on it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from extractors.media import Probe, probe
from storage.atomic import filesystem, join, read_json, write_json
from storage.manifest import ManifestRow
from usv.config import IngestConfig
from usv.errors import ErrorKind, UsvError


@dataclass(frozen=True)
class Ingested:
    video_id: str
    source: str
    content_hash: str
    size: int
    probe: Probe
    local_path: str | None  # None until `localize` fetched a remote source
    reused: bool = False  # identified from the memo, without reading the source


def _stamp(source: str, timeout_s: float) -> tuple[int, str]:
    """Size and a change stamp for `source`, without reading its bytes."""
    if source.startswith(("http://", "https://")):
        req = urllib.request.Request(source, method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                size = int(resp.headers.get("Content-Length") or -1)
                return size, str(resp.headers.get("ETag") or resp.headers.get("Last-Modified") or "")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UsvError(ErrorKind.FETCH, f"cannot reach {source}: {exc}") from exc
    fs, path = filesystem(source)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise UsvError(ErrorKind.FETCH, f"source does not exist: {source}") from exc
    except OSError as exc:
        raise UsvError(ErrorKind.FETCH, f"cannot stat {source}: {exc}") from exc
    if info.get("type") == "directory":
        raise UsvError(ErrorKind.NOT_A_VIDEO, f"source is a directory: {source}")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    return int(info.get("size") or 0), str(stamp)


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None, cfg: IngestConfig, source: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(cfg.chunk_bytes):
        size += len(chunk)
        if size > cfg.max_bytes:
            raise UsvError(ErrorKind.FETCH, f"{source} is larger than ingest.max_bytes={cfg.max_bytes}")
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), size


def _is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def _fetch(source: str, dest: Path, cfg: IngestConfig) -> tuple[str, int]:
    """Stream `source` into `dest` atomically; return (sha256, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
    try:
        with open(tmp, "wb") as out:
            if source.startswith(("http://", "https://")):
                with urllib.request.urlopen(source, timeout=cfg.http_timeout_s) as resp:
                    result = _copy_hashing(resp, out, cfg, source)
            else:
                fs, path = filesystem(source)
                with fs.open(path, "rb") as src:
                    result = _copy_hashing(src, out, cfg, source)
        os.replace(tmp, dest)
        return result
    except UsvError:
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise UsvError(ErrorKind.FETCH, f"cannot fetch {source}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


class Ingestor:
    """Identifies videos under an output root: `state/ingest/<id>.json` remembers each one."""

    def __init__(self, root: str, media_cache: Path, cfg: IngestConfig) -> None:
        self.root = root
        self.media_cache = media_cache
        self.cfg = cfg

    def _memo_url(self, video_id: str) -> str:
        return join(self.root, "state", "ingest", f"{video_id}.json")

    def _media_path(self, video_id: str) -> Path:
        return self.media_cache / video_id

    def identify(self, row: ManifestRow) -> Ingested:
        """Hash and probe the source, reusing the memo when the source is unchanged."""
        size, stamp = _stamp(row.source, self.cfg.http_timeout_s)
        try:
            memo = read_json(self._memo_url(row.video_id))
        except (FileNotFoundError, ValueError):
            memo = None
        local = _is_local(row.source)
        if memo and memo["source"] == row.source and memo["size"] == size and memo["stamp"] == stamp:
            path = filesystem(row.source)[1] if local else None
            return Ingested(row.video_id, row.source, memo["sha256"], size, Probe(**memo["probe"]), path, reused=True)
        if local:
            path = filesystem(row.source)[1]
            try:
                with open(path, "rb") as fh:
                    sha, size = _copy_hashing(fh, None, self.cfg, row.source)
            except OSError as exc:
                raise UsvError(ErrorKind.FETCH, f"cannot read {row.source}: {exc}") from exc
        else:
            path = str(self._media_path(row.video_id))
            sha, size = _fetch(row.source, Path(path), self.cfg)
        meta = probe(path)
        write_json(self._memo_url(row.video_id), {
            "source": row.source, "size": size, "stamp": stamp, "sha256": sha, "probe": meta.to_dict(),
        })
        return Ingested(row.video_id, row.source, sha, size, meta, path)

    def localize(self, item: Ingested) -> str:
        """A local path with the identified bytes, fetching a remote source if needed."""
        if item.local_path:
            return item.local_path
        dest = self._media_path(item.video_id)
        if dest.exists() and dest.stat().st_size == item.size:
            return str(dest)
        sha, _ = _fetch(item.source, dest, self.cfg)
        if sha != item.content_hash:
            raise UsvError(ErrorKind.FETCH, f"{item.source} changed while the build ran; re-run to pick it up")
        return str(dest)

    def forget_media(self, item: Ingested) -> None:
        """Drop a downloaded copy once every stage has had it (local sources stay)."""
        if not _is_local(item.source):
            self._media_path(item.video_id).unlink(missing_ok=True)
