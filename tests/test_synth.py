"""The synthetic corpus is what later OCR/ASR/diarization/fusion tests measure against, so its
files must be valid media, its truth exact, its factors as documented and its bytes reproducible."""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from usv import synth

pytestmark = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
    reason="needs ffmpeg and espeak-ng (apt-get install ffmpeg espeak-ng fonts-dejavu-core)",
)
SECONDS = 6.0
TOPICS = 4


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): synth.file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    manifest = synth.make_corpus(root, topics=TOPICS, per_topic=1, seconds=SECONDS, seed=0)
    assert manifest == root / "manifest.csv"
    return root


def _truth(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "truth.jsonl").read_text().splitlines()]


def _check_factors(groups: dict[int, tuple[int, int, int]]) -> None:
    """No single factor names a topic, any two factors together do."""
    topics = list(groups)
    for m in range(3):
        for t in topics:
            assert sum(groups[u][m] == groups[t][m] for u in topics) >= 2, (m, t, groups)
    for a, b in itertools.combinations(range(3), 2):
        pairs = [(groups[t][a], groups[t][b]) for t in topics]
        assert len(set(pairs)) == len(topics), (a, b, groups)


@pytest.mark.parametrize("topics", [4, 6, 8, 10, 12, 16])
def test_factor_rule_even_topic_counts(topics: int) -> None:
    groups = {t: tuple(vars(synth.topic_factors(t, topics)).values()) for t in range(topics)}
    _check_factors(groups)


def test_manifest_rows(corpus: Path) -> None:
    with (corpus / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == synth.COLUMNS
        rows = list(reader)
    assert len(rows) == TOPICS
    assert len({r["topic"] for r in rows}) == TOPICS
    for r in rows:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", r["video_id"])
        assert (corpus / r["source"]).is_file() and not Path(r["source"]).is_absolute()
        assert r["split"] == "" and r["language"] == "en" and r["macro_topic"]
        assert r["topic"] in r["title"]


def test_videos_have_streams_duration_and_size(corpus: Path) -> None:
    for video in sorted((corpus / "videos").glob("*.mp4")):
        info = _probe(video)
        kinds = {s["codec_type"]: s for s in info["streams"]}
        assert set(kinds) == {"video", "audio"}
        v, a = kinds["video"], kinds["audio"]
        assert (v["codec_name"], v["width"], v["height"]) == ("h264", 640, 360)
        assert v["r_frame_rate"] == "25/1"
        assert a["codec_name"] == "aac"
        assert abs(float(info["format"]["duration"]) - SECONDS) <= 0.15
        assert abs(float(a["duration"]) - SECONDS) <= 0.15


def test_truth_times_and_speakers(corpus: Path) -> None:
    truth = _truth(corpus)
    assert [t["video_id"] for t in truth] == [f"t{i}-v0" for i in range(TOPICS)]
    for t in truth:
        assert t["watermark"] == synth.WATERMARK
        subs, speech = t["subtitles"], t["speech"]
        assert 2 <= len(subs) <= 3
        for s in subs:
            assert s["start"] >= 0 and s["end"] <= SECONDS and s["end"] - s["start"] >= 2.0 - 1e-6
            assert 3 <= len(s["text"].split()) <= 6 and s["text"].isascii()
        for seq in (subs, speech):
            for prev, nxt in itertools.pairwise(seq):
                assert prev["end"] <= nxt["start"], (t["video_id"], prev, nxt)
        assert speech and all(0 <= s["start"] < s["end"] <= SECONDS for s in speech)
        assert t["num_speakers"] == len({s["speaker"] for s in speech}) in (1, 2)
        if t["num_speakers"] == 2:
            voices = {s["speaker"]: (s["voice"], s["pitch"]) for s in speech}
            assert len(set(voices.values())) == 2


def test_corpus_factors_split_the_topic(corpus: Path) -> None:
    groups = {i: (t["visual_group"], t["audio_group"], t["text_group"]) for i, t in enumerate(_truth(corpus))}
    _check_factors(groups)


def test_same_seed_same_bytes_other_seed_differs(corpus: Path, tmp_path: Path) -> None:
    synth.make_corpus(tmp_path / "again", topics=TOPICS, per_topic=1, seconds=SECONDS, seed=0)
    synth.make_corpus(tmp_path / "other", topics=TOPICS, per_topic=1, seconds=SECONDS, seed=1)
    first, again, other = _digests(corpus), _digests(tmp_path / "again"), _digests(tmp_path / "other")
    assert first == again
    assert set(other) == set(first)
    assert all(other[name] != first[name] for name in first if name.endswith(".mp4"))


def test_broken_inputs(tmp_path: Path) -> None:
    rows = synth.add_broken_inputs(tmp_path)
    assert [tuple(r) for r in rows] == [synth.COLUMNS] * 3
    not_video, no_audio, missing = (tmp_path / r["source"] for r in rows)
    probe = subprocess.run(["ffprobe", "-v", "error", str(not_video)], capture_output=True, check=False)
    assert probe.returncode != 0
    streams = _probe(no_audio)["streams"]
    assert [s["codec_type"] for s in streams] == ["video"]
    assert not missing.exists()


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(synth.shutil, "which", lambda tool: None if tool == "espeak-ng" else "/usr/bin/x")
    with pytest.raises(synth.MissingToolError, match="apt-get install espeak-ng"):
        synth.make_corpus(tmp_path)
