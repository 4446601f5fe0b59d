"""Unit tests of the foundation's storage pieces: manifest, ids, cache keys, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extractors.base import make_stage
from storage.atomic import TMP_PREFIX, atomic_local_path, write_bytes
from storage.cache_keys import stage_keys, video_key
from storage.ids import sanitize_id
from storage.manifest import ManifestError, load_manifest
from usv.config import BuildConfig, PackConfig
from usv.errors import ConfigError

HEADER = "video_id,source,title,topic\n"


def _csv(tmp_path: Path, body: str, header: str = HEADER) -> str:
    path = tmp_path / "m.csv"
    path.write_text(header + body)
    return str(path)


def _problems(url: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ManifestError) as info:
        load_manifest(url)
    return [(p.row, p.column, p.message) for p in info.value.problems]


# -- manifest ----------------------------------------------------------------------------
def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    url = _csv(tmp_path, "a,a.mp4,x\n", header="video_id,source,title\n")
    assert _problems(url) == [(1, "topic", "required column is missing")]
    with pytest.raises(ManifestError, match=r"m\.csv: row 1, column 'topic'"):
        load_manifest(url)


def test_empty_values_and_bad_split_are_reported_with_rows(tmp_path: Path) -> None:
    url = _csv(tmp_path, "a,a.mp4,t,\n,b.mp4,t,x\nc,c.mp4,t,x,holdout\n", header="video_id,source,title,topic,split\n")
    problems = _problems(url)
    assert (2, "topic", "is empty") in problems
    assert (3, "video_id", "is empty") in problems
    assert any(r == 4 and c == "split" and "holdout" in m for r, c, m in problems)


def test_unknown_format_bad_json_and_empty_manifest(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("x")
    assert _problems(str(tmp_path / "m.txt"))[0][2].startswith("unknown format")
    (tmp_path / "m.jsonl").write_text('{"video_id": "a", "source": "a.mp4", "title": "", "topic": "x"}\n{oops\n')
    assert _problems(str(tmp_path / "m.jsonl"))[0][:2] == (2, "*")
    assert _problems(_csv(tmp_path, ""))[0][2] == "manifest has no rows"
    assert _problems(str(tmp_path / "absent.csv"))[0][2] == "file not found"


def test_duplicates_first_wins_and_sources_resolve_next_to_manifest(tmp_path: Path) -> None:
    url = _csv(tmp_path, "a,videos/a.mp4,first,x\nb,/abs/b.mp4,t,y\na,other.mp4,second,x\n")
    m = load_manifest(url)
    assert [r.video_id for r in m.rows] == ["a", "b"]
    assert m.rows[0].title == "first" and m.rows[0].source == str(tmp_path / "videos" / "a.mp4")
    assert m.rows[1].source == "/abs/b.mp4"
    assert [(d.video_id, d.row) for d in m.duplicates] == [("a", 4)]


def test_jsonl_and_parquet_manifests_read_alike(tmp_path: Path) -> None:
    rows = [{"video_id": "v/1", "source": "s3://bucket/v1.mp4", "title": "t", "topic": "x", "language": "zh"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    a, b = load_manifest(str(tmp_path / "m.jsonl")), load_manifest(str(tmp_path / "m.parquet"))
    assert a.rows[0].model_dump(exclude={"row"}) == b.rows[0].model_dump(exclude={"row"})
    assert a.rows[0].video_id == sanitize_id("v/1") and a.rows[0].raw_id == "v/1"
    assert a.rows[0].source == "s3://bucket/v1.mp4"


# -- ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["a.b", "../etc/passwd", "dir/x", "dir\\x", "..", "视频 1", " a", "a" * 300, ".hidden"])
def test_sanitized_ids_are_safe_keys(raw: str) -> None:
    clean = sanitize_id(raw)
    assert clean and len(clean) <= 128
    assert not any(c in clean for c in "./\\ ") and ".." not in clean
    assert sanitize_id(raw) == clean


def test_clean_ids_are_kept_and_distinct_raw_ids_never_collide() -> None:
    assert sanitize_id("t0-v1_x") == "t0-v1_x"
    raws = ["a.b", "a_b", "a/b", "a b", "a..b", "A.B"]
    assert len({sanitize_id(r) for r in raws}) == len(raws)


# -- cache keys --------------------------------------------------------------------------
def test_cache_key_changes_with_each_input() -> None:
    base = video_key("fp1", "sha1", {"ocr": "k1"}, {"title": "t"})
    assert base == video_key("fp1", "sha1", {"ocr": "k1"}, {"title": "t"})
    variants = [video_key("fp2", "sha1", {"ocr": "k1"}, {"title": "t"}),
                video_key("fp1", "sha2", {"ocr": "k1"}, {"title": "t"}),
                video_key("fp1", "sha1", {"ocr": "k2"}, {"title": "t"}),
                video_key("fp1", "sha1", {"ocr": "k1"}, {"title": "u"})]
    assert base not in variants and len(set(variants)) == 4


def test_stage_settings_change_only_that_stage_key(small_corpus: Path) -> None:
    row = load_manifest(str(small_corpus)).rows[0]
    a = stage_keys([make_stage("meta"), make_stage("mel"), make_stage("frames")], "sha", row)
    b = stage_keys([make_stage("meta"), make_stage("mel", {"n_mels": 64}), make_stage("frames")], "sha", row)
    assert a["meta"] == b["meta"] and a["frames"] == b["frames"] and a["mel"] != b["mel"]
    relabelled = row.model_copy(update={"topic": "other"})
    c = stage_keys([make_stage("meta"), make_stage("mel")], "sha", relabelled)
    assert c["meta"] != a["meta"] and c["mel"] == a["mel"]  # labels feed meta.json only


def test_unknown_stage_and_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        make_stage("nope")
    with pytest.raises(ConfigError, match="bad settings for stage 'mel'"):
        make_stage("mel", {"n_mel": 64})
    with pytest.raises(ValueError, match="split_ratios"):
        PackConfig(split_ratios={"train": 0.5})
    with pytest.raises(ValueError):
        BuildConfig(stages=["mel"], batch_sise=3)


# -- atomic writes -----------------------------------------------------------------------
def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    write_bytes(str(target), b"one")
    write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    target = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError), atomic_local_path(str(target)) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_write_never_exposes_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    code = (
        "import sys; from storage.atomic import atomic_local_path\n"
        f"with atomic_local_path({str(target)!r}) as tmp:\n"
        "    with open(tmp, 'wb') as fh:\n"
        "        print('writing', flush=True)\n"
        "        while True: fh.write(b'x' * 1_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert all(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


def test_weight_digests_are_memoised_on_disk_until_the_file_changes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import extractors.base as base

    monkeypatch.setenv("USV_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(base, "_DIGESTS", {})
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    first = base.file_digest([weights])
    memo = tmp_path / "models" / "weight-digests.json"
    known = json.loads(memo.read_text())
    assert list(known.values()) == [first]
    memo.write_text(json.dumps({k: "from-the-memo" for k in known}))  # a new process trusts the memo …
    monkeypatch.setattr(base, "_DIGESTS", {})
    assert base.file_digest([weights]) == "from-the-memo"
    weights.write_bytes(b"b" * 1001)  # … until the file's size or mtime changes
    changed = base.file_digest([weights])
    assert changed not in (first, "from-the-memo") and len(changed) == 16
