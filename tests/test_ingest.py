"""Ingest from a local path, a real http server on loopback and an fsspec URL."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.ingest import Ingestor
from storage.manifest import ManifestRow
from usv.config import IngestConfig
from usv.errors import ErrorKind, UsvError


@pytest.fixture(scope="module")
def video(small_corpus: Path) -> Path:
    return sorted((small_corpus.parent / "videos").glob("*.mp4"))[0]


@pytest.fixture(scope="module")
def http_root(video: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _row(source: str, vid: str = "v") -> ManifestRow:
    return ManifestRow(video_id=vid, raw_id=vid, source=source, title="", topic="t")


def test_local_http_and_fsspec_sources_give_the_same_hash(video: Path, http_root: str, tmp_path: Path) -> None:
    expected = hashlib.sha256(video.read_bytes()).hexdigest()
    ing = Ingestor(str(tmp_path / "out"), tmp_path / "media", IngestConfig())
    local = ing.identify(_row(str(video), "a"))
    remote = ing.identify(_row(f"{http_root}/{video.name}", "b"))
    fsspec_url = ing.identify(_row(f"file://{video}", "c"))
    assert local.content_hash == remote.content_hash == fsspec_url.content_hash == expected
    assert remote.probe == local.probe and local.probe.has_audio
    assert Path(ing.localize(remote)).read_bytes() == video.read_bytes()
    again = ing.identify(_row(f"{http_root}/{video.name}", "b"))
    assert again.reused and again.content_hash == expected  # unchanged: neither re-read nor re-downloaded
    assert not local.reused and ing.identify(_row(str(video), "a")).reused


def test_fetch_errors_are_typed(video: Path, http_root: str, tmp_path: Path) -> None:
    ing = Ingestor(str(tmp_path / "out"), tmp_path / "media", IngestConfig(max_bytes=1000))
    cases = {
        f"{http_root}/{video.name}": "larger than ingest.max_bytes",
        f"{http_root}/absent.mp4": "cannot reach",
        str(tmp_path / "absent.mp4"): "does not exist",
        "http://127.0.0.1:9/x.mp4": "cannot reach",
    }
    for source, message in cases.items():
        with pytest.raises(UsvError) as info:
            ing.identify(_row(source))
        assert info.value.kind is ErrorKind.FETCH and message in info.value.message, source
    assert not list((tmp_path / "media").glob("*"))  # nothing half-downloaded left behind
