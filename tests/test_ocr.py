"""OCR is measured against the synthetic corpus's exact subtitles (truth.jsonl, made by ffmpeg
drawtext): character error rate of the video subtitle, watermark kept out, determinism, the
frame-skip lever, and a real clip (bigbuckbunny) through the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest

from extractors.base import Video, make_stage
from extractors.media import decode_frames, probe
from extractors.ocr_text import join_rows, mark_watermarks, norm, subtitle_lines
from flows.pipeline import load_stages, process_batch
from storage.feature_store import FeatureStore
from storage.manifest import load_manifest
from usv.config import BuildConfig
from usv.errors import ConfigError

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                                  reason="needs ffmpeg and espeak-ng")


def _line(text: str, x: float, y: float, w: float = 100, h: float = 20, conf: float = 0.9) -> dict[str, Any]:
    return {"text": text, "conf": conf, "box": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]}


def test_post_processing_marks_watermarks_and_merges_repeats() -> None:
    mark = lambda t: _line(t, 500, 10, 90, 16)  # noqa: E731
    frames = [
        {"lines": [mark("USV SYNTH"), _line("hello", 100, 300), _line("world", 205, 300)]},
        {"lines": [mark("USVSYNTH"), _line("helloworld", 100, 300, 205)]},
        {"lines": [_line("SYNTH", 540, 10, 50, 16)]},  # a cut reading of the watermark
        {"lines": [mark("USV.SYNTH"), _line("next line here", 90, 300, 220)]},
        {"lines": [mark("USV SYNTH")]},  # OCR missed the subtitle here...
        {"lines": [mark("USV SYNTH"), _line("next line here", 90, 300, 220)]},  # ...so it is carried over
    ]
    for f in frames:
        f["lines"] = join_rows(f["lines"])
    assert frames[0]["lines"][1]["text"] == "hello world"
    assert mark_watermarks(frames, 640, 360) == ["USV SYNTH"]
    assert all(ln["watermark"] == (ln["box"][0][1] < 50) for f in frames for ln in f["lines"])
    lines = subtitle_lines(frames, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1.0)
    assert lines == [{"start": 0.0, "end": 2.0, "text": "hello world"},
                     {"start": 3.0, "end": 6.0, "text": "next line here"}]
    assert norm("The  Wave!") == norm("thewave")


def test_moving_or_rare_text_is_not_a_watermark() -> None:
    frames = [{"lines": [_line("scrolling news", 10 + 60 * i, 200)]} for i in range(6)]
    frames[0]["lines"].append(_line("once", 10, 10))
    assert mark_watermarks(frames, 640, 360) == []
    assert len(subtitle_lines(frames, [float(i) for i in range(6)], 1.0)) == 2


def test_easyocr_other_languages_need_a_model_folder() -> None:
    stage = make_stage("ocr", {"backend": "easyocr", "languages": ["ch_sim", "en"]})
    with pytest.raises(ConfigError, match=r"stage_config\.ocr\.easyocr_model_dir"):
        stage.weights_id()


# --- the real models on the synthetic corpus ----------------------------------------------------


@pytest.fixture(scope="session")
def ocr_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from usv.synth import make_corpus

    return make_corpus(tmp_path_factory.mktemp("ocr-corpus"), topics=4, per_topic=1, seconds=8.0)


def run_ocr(manifest: Path, out: Path, settings: dict[str, Any] | None = None, **build: Any) -> dict[str, bytes]:
    """Build stages meta+ocr with the real pipeline; the `ocr.json` bytes of every video."""
    cfg = BuildConfig(manifest=str(manifest), output=str(out), stages=["meta", "ocr"],
                      stage_config={"ocr": settings or {}}, **build)
    report = process_batch(load_manifest(str(manifest)).rows, cfg, "test")
    assert report.counts["ocr"] == {"ok": report.videos}, report.counts
    fp = load_stages(cfg, ["ocr"])[0].fingerprint()
    store = FeatureStore(str(out))
    docs = {}
    for path in sorted((out / "features" / "ocr" / fp).glob("*.parquet")):
        vid, key = path.stem.rsplit("-", 1)
        docs[vid] = store.read("ocr", fp, vid, key)["ocr.json"]
    return docs


def truth_subtitles(manifest: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (manifest.parent / "truth.jsonl").read_text().splitlines()]
    return {r["video_id"]: "\n".join(s["text"] for s in sorted(r["subtitles"], key=lambda s: s["start"]))
            for r in rows}


def cer(truth: dict[str, str], docs: dict[str, bytes], spaces: bool = True) -> float:
    ids = sorted(truth)
    fix = (lambda s: s.replace("\n", " ")) if spaces else (lambda s: "".join(s.split()).lower())
    return float(jiwer.cer([fix(truth[i]) for i in ids], [fix(json.loads(docs[i])["subtitle"]) for i in ids]))


@pytest.mark.slow
@needs_ffmpeg
def test_rapidocr_subtitles_match_truth_and_are_deterministic(ocr_corpus: Path, tmp_path: Path) -> None:
    docs = run_ocr(ocr_corpus, tmp_path / "a")
    truth = truth_subtitles(ocr_corpus)
    assert set(docs) == set(truth)
    error = cer(truth, docs)
    assert error <= 0.05, {v: json.loads(d)["subtitle"] for v, d in docs.items()}
    assert cer(truth, docs, spaces=False) <= 0.05
    for doc in map(json.loads, docs.values()):
        assert "usvsynth" not in norm(doc["subtitle"])
        assert [norm(w) for w in doc["watermarks"]] == ["usvsynth"]
        assert [ln["start"] for ln in doc["subtitle_lines"]] == sorted(ln["start"] for ln in doc["subtitle_lines"])
        assert all(0.0 <= p[0] <= 640 and 0.0 <= p[1] <= 360 for f in doc["frames"] for ln in f["lines"]
                   for p in ln["box"])
    # same input, same bytes: OCR ran in its worker process above (`own_process`), here in this one
    from flows.isolation import _WORKERS

    assert any(w.stage.name == "ocr" and w._proc is not None for w in _WORKERS.values())
    assert run_ocr(ocr_corpus, tmp_path / "b", own_process=[]) == docs


@pytest.mark.slow
@needs_ffmpeg
def test_skipping_unchanged_frames_keeps_the_subtitle(ocr_corpus: Path, tmp_path: Path) -> None:
    """Each frame shown twice (a static stretch): OCR runs once per distinct frame and the
    video subtitle equals the one from OCR on every frame."""
    row = load_manifest(str(ocr_corpus)).rows[0]
    meta = probe(row.source)
    frames, _ = decode_frames(row.source, meta, 1.0, (meta.width, meta.height), tmp_path / "f.rgb")
    video = Video(row, "x", meta, np.repeat(np.asarray(frames), 2, axis=0), np.arange(2 * len(frames)) / 2.0)
    out = {}
    for skip in (True, False):
        stage = make_stage("ocr", {"skip_static": skip})
        stage.ensure_setup()
        out[skip] = stage.ocr_video(video)
    reused = sum(f["reused"] for f in out[True]["frames"])
    assert reused >= len(frames)
    assert not any(f["reused"] for f in out[False]["frames"])
    assert out[True]["subtitle"] == out[False]["subtitle"]
    assert jiwer.cer(truth_subtitles(ocr_corpus)[row.video_id], out[True]["subtitle"]) <= 0.05


@pytest.mark.slow
def test_real_clip_bigbuckbunny(bigbuckbunny: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"video_id,source,title,topic\nbbb,{bigbuckbunny},Big Buck Bunny,animation\n")
    docs = run_ocr(manifest, tmp_path / "out")
    doc = json.loads(docs["bbb"])
    assert len(doc["frames"]) == 6 and isinstance(doc["subtitle"], str)  # 1 fps over 5.31 s: t = 0 … 5
    assert doc["subtitle"] == "\n".join(ln["text"] for ln in doc["subtitle_lines"])
    for f in doc["frames"]:
        for ln in f["lines"]:  # boxes in the source's 1280×720 pixels, confident lines only
            assert ln["conf"] >= 0.75 and all(0 <= x <= 1280 and 0 <= y <= 720 for x, y in ln["box"])
    table = make_stage("ocr").table_rows("bbb", {"ocr.json": docs["bbb"]})["ocr_lines"]
    assert [r["text"] for r in table if not r["watermark"]] == [ln["text"] for ln in doc["subtitle_lines"]]


@pytest.mark.slow
@needs_ffmpeg
def test_openvino_reads_what_onnxruntime_reads_and_unchanged_text_is_read_once(ocr_corpus: Path,
                                                                                tmp_path: Path) -> None:
    """The two runtimes of RapidOCR's ONNX models give the same lines; a subtitle that stays while the
    picture above it changes is recognised once and reused, with the same subtitle as without reuse."""
    row = load_manifest(str(ocr_corpus)).rows[0]
    meta = probe(row.source)
    frames, _ = decode_frames(row.source, meta, 1.0, (meta.width, meta.height), tmp_path / "f.rgb")
    video = Video(row, "x", meta, np.asarray(frames), np.arange(len(frames), dtype=float))
    lines = {}
    for runtime in ("onnxruntime", "openvino"):
        stage = make_stage("ocr", {"runtime": runtime, "reuse_lines": False})
        stage.ensure_setup()
        doc = stage.ocr_video(video)
        lines[runtime] = [[(ln["text"], ln["conf"]) for ln in f["lines"]] for f in doc["frames"]]
    ort, ov = lines["onnxruntime"], lines["openvino"]
    assert [[t for t, _ in f] for f in ort] == [[t for t, _ in f] for f in ov]
    np.testing.assert_allclose([c for f in ort for _, c in f], [c for f in ov for _, c in f], atol=1e-3)

    rng = np.random.default_rng(0)  # the same frame, its top half new noise every second
    still = np.repeat(np.asarray(frames)[1:2], 4, axis=0)
    still[:, : meta.height // 2] = rng.integers(0, 255, still[:, : meta.height // 2].shape, dtype=np.uint8)
    moving = Video(row, "x", meta, still, np.arange(4, dtype=float))
    docs = {}
    for reuse in (True, False):
        stage = make_stage("ocr", {"reuse_lines": reuse})
        stage.ensure_setup()
        docs[reuse] = stage.ocr_video(moving)
        if reuse:
            assert stage.backend.memo.reused >= 3  # the subtitle in frames 2-4
    assert not any(f["reused"] for f in docs[True]["frames"])  # the frame-level skip did not fire
    read = {reuse: [[ln["text"] for ln in f["lines"]] for f in doc["frames"]] for reuse, doc in docs.items()}
    assert read[True] == read[False]
    first = norm(truth_subtitles(ocr_corpus)[row.video_id].splitlines()[0])
    assert all(any(norm(t) == first for t in frame) for frame in read[True])
