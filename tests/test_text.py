"""Text embeddings: the offline encoders on strings (meaning, empties, determinism), and the
audio stages end to end through the real pipeline on synthetic videos plus a video without an
audio track: asr/diarize/mel are recorded `no_audio`, while `text` still embeds its title and
subtitle (the `optional_requires` contract)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from extractors.base import Video, make_stage
from extractors.media import Probe
from extractors.text import MINILM, USE, embed_texts, encode_unique, load_encoder
from flows.pipeline import load_stages, process_batch
from storage.feature_store import FeatureStore
from storage.ledger import Ledger
from storage.manifest import ManifestRow, load_manifest
from usv.config import BuildConfig
from usv.errors import ConfigError

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                  reason="needs ffmpeg and espeak-ng")


def text_video(title: str, subtitle: str | None, transcript: str | None, video_id: str = "v") -> Video:
    probe = Probe(4.0, 25.0, 64, 64, 0, "h264", "", False, 16000, "mp4")
    upstream = {}
    if subtitle is not None:
        upstream["ocr"] = {"ocr.json": json.dumps({"subtitle": subtitle}).encode()}
    if transcript is not None:
        upstream["asr"] = {"asr.json": json.dumps({"text": transcript}).encode()}
    row = ManifestRow(video_id=video_id, raw_id=video_id, source="", title=title, topic="t")
    return Video(row, "hash", probe, upstream=upstream)


def test_bad_model_setting_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"text\.model"):
        make_stage("text", {"model": str(tmp_path)}).weights_id()
    stage = make_stage("text")
    assert stage.row_inputs(text_video("a title", "", "").row) == {"title": "a title"}


@pytest.mark.slow
def test_minilm_stage_embeds_meaning_and_flags_empty_fields() -> None:
    stage = make_stage("text")
    stage.ensure_setup()
    videos = [text_video("cooking pasta with tomato sauce", "chop the tomato and garlic", "", "a"),
              text_video("fixing a car engine", "", None, "b")]
    results = stage.process(videos)
    assert stage.process(videos[1:]) == results[1:]  # same input, same bytes, alone or in a batch
    emb = [np.load(__import__("io").BytesIO(r["text.npy"])) for r in results]  # type: ignore[index]
    assert emb[0].dtype == np.float16 and emb[0].shape == (3, 384)
    meta = [json.loads(r["text.json"]) for r in results]  # type: ignore[index]
    assert meta[0] == {"fields": ["title", "subtitle", "transcript"], "model": MINILM, "empty": [False, False, True]}
    assert meta[1]["empty"] == [False, True, True]
    assert not emb[1][1:].any() and np.allclose(np.linalg.norm(emb[0][:2].astype(np.float32), axis=1), 1, atol=1e-2)
    same = float(emb[0][0].astype(np.float32) @ emb[0][1].astype(np.float32))
    other = float(emb[0][1].astype(np.float32) @ emb[1][0].astype(np.float32))
    assert same > other + 0.2, (same, other)
    names = embed_texts(["cooking", "cars"])  # the shared helper lives in the same space
    assert float(names[0] @ emb[0][0].astype(np.float32)) > float(names[1] @ emb[0][0].astype(np.float32))


@pytest.mark.slow
def test_multilingual_use_matches_across_languages() -> None:
    enc = load_encoder(USE)
    emb = encode_unique(enc, ["做饭 番茄 大蒜", "cooking with tomato and garlic", "", "修理 汽车 发动机"])
    assert emb.shape == (4, 512) and not emb[2].any()
    assert emb[0] @ emb[1] > emb[3] @ emb[1] + 0.1
    assert np.array_equal(encode_unique(enc, ["cooking with tomato and garlic"])[0], emb[1])


# --- audio stages end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_with_silent_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from usv.synth import COLUMNS, add_broken_inputs, make_corpus

    root = tmp_path_factory.mktemp("audio-corpus")
    manifest = make_corpus(root, topics=2, per_topic=1, seconds=6.0, seed=3)
    with open(manifest, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writerows(r for r in add_broken_inputs(root) if r["video_id"] != "broken-missing")
    return manifest


@pytest.mark.slow
@needs_ffmpeg
def test_no_audio_video_still_gets_text_and_everything_caches(corpus_with_silent_video: Path, tmp_path: Path) -> None:
    import jiwer

    manifest = corpus_with_silent_video
    cfg = BuildConfig(manifest=str(manifest), output=str(tmp_path / "out"),
                      stages=["meta", "mel", "ocr", "diarize", "asr", "text"])
    rows = load_manifest(str(manifest)).rows
    report = process_batch(rows, cfg, "first")
    assert report.counts["text"] == {"ok": 3}, report.counts
    for stage in ("mel", "diarize", "asr"):
        assert report.counts[stage] == {"ok": 2, "error:no_audio": 1}, report.counts
    assert report.counts["ingest"].get("error:not_a_video") == 1

    latest = Ledger(cfg.output).latest().to_pylist()
    status = {(r["video_id"], r["stage"]): (r["status"], r["error_kind"]) for r in latest}
    assert status[("broken-no-audio", "asr")] == ("error", "no_audio")
    assert status[("broken-no-audio", "text")] == ("ok", "")
    seconds: dict[str, list[float]] = {}
    for r in latest:
        if r["status"] == "ok":
            seconds.setdefault(r["stage"], []).append(r["seconds"])
    print("seconds per video:", {s: round(sum(v) / len(v), 2) for s, v in sorted(seconds.items())})

    store = FeatureStore(cfg.output)
    stages = {s.name: s for s in load_stages(cfg)}
    features: dict[tuple[str, str], dict[str, bytes]] = {}
    for name in ("asr", "text"):
        fp = stages[name].fingerprint()
        for path in sorted((Path(cfg.output) / "features" / name / fp).glob("*.parquet")):
            vid, key = path.stem.rsplit("-", 1)
            features[(vid, name)] = store.read(name, fp, vid, key)
    silent = json.loads(features[("broken-no-audio", "text")]["text.json"])
    # the title, no transcript (its one subtitle spans the whole clip, so OCR calls it a watermark)
    assert silent["empty"][0] is False and silent["empty"][2] is True

    truth = {json.loads(line)["video_id"]: json.loads(line)
             for line in (manifest.parent / "truth.jsonl").read_text().splitlines()}
    refs, hyps = [], []
    for vid, t in sorted(truth.items()):
        asr = json.loads(features[(vid, "asr")]["asr.json"])
        assert asr["language"] == "en" and {s["speaker"] for s in asr["segments"]} <= {"SPEAKER_00", "SPEAKER_01"}
        assert json.loads(features[(vid, "text")]["text.json"])["empty"] == [False, False, False]
        refs.append(" ".join(s["text"] for s in t["speech"]))
        hyps.append(asr["text"].lower().replace(".", "").replace(",", "").replace("!", "").replace("?", ""))
    wer = jiwer.wer(refs, hyps)
    print(f"WER on synthetic espeak speech: {wer:.3f}")
    assert wer <= 0.5  # robotic voices; the LibriVox test holds the real bar

    again = process_batch(rows, cfg, "second")  # nothing changed: every stage is a cache hit
    for stage in ("meta", "mel", "ocr", "diarize", "asr", "text"):
        assert set(again.counts[stage]) <= {"cached", "error:no_audio"}, again.counts
    assert again.counts["text"] == {"cached": 3}
