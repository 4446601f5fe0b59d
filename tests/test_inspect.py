"""`usv inspect` on the shared real build (tests/test_report.py): shard and feature-store reads
agree, OCR boxes land where the OCR found text, failures are explained, the page renders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import assert_clean_page, built_root, chromium
from typer.testing import CliRunner

from extractors.base import npy_bytes
from usv.cli import app
from usv.inspect import _from_store, array_summary, draw_frames, gather, transcript

GOOD = "t0-v0"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return built_root(tmp_path_factory)


@pytest.mark.slow
def test_a_packed_video_shows_every_stage(build: tuple[Path, list[str]]) -> None:
    root, stages = build
    info = gather(str(root), GOOD)
    assert info["source"].startswith("shard ")
    assert {"meta.json", "mel.npy", "frames.json"} <= set(info["members"])
    assert {r["stage"] for r in info["ledger"]} == {"ingest", *stages}
    assert all(r["status"] == "ok" for r in info["ledger"])
    mel = next(a for a in info["arrays"] if a["member"] == "mel.npy")
    assert mel["shape"][0] == 80 and mel["finite"] and "row_norms" not in mel
    assert info["docs"]["meta.json"]["video_id"] == GOOD
    if "diarize" in stages:
        rows = transcript(info)
        assert rows and all(r["speaker"] and r["end"] > r["start"] for r in rows)
    # the feature store holds the same members (the packer only adds split/provenance to meta.json)
    index = json.loads((root / "shards" / "index.json").read_text())
    stored = _from_store(str(root), GOOD, info["ledger"], index["stages"])
    shard = info["_bytes"]
    assert set(stored) == set(shard) == set(info["members"])
    assert all(stored[m] == shard[m] for m in shard if m != "meta.json")
    assert json.loads(stored["meta.json"])["title"] == info["docs"]["meta.json"]["title"]


@pytest.mark.slow
def test_ocr_boxes_are_drawn_where_the_text_is(build: tuple[Path, list[str]]) -> None:
    root, stages = build
    if "ocr" not in stages:
        pytest.skip("no ocr stage here")
    info = gather(str(root), GOOD)
    drawn = draw_frames(info)
    assert len(drawn) == len(info["frame_members"]) > 0
    t, png = drawn[0]
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    plain = np.asarray(Image.open(io.BytesIO(info["_bytes"][info["frame_members"][0]])).convert("RGB")).astype(int)
    changed = np.abs(img - plain).sum(axis=2) > 60
    assert changed.any(), "no box drawn"
    lines = next(f["lines"] for f in info["docs"]["ocr.json"]["frames"] if round(f["t"], 3) == round(t, 3))
    scale = img.shape[1] / info["docs"]["meta.json"]["width"]
    inside = np.zeros_like(changed)
    for line in lines:
        xs, ys = [p[0] * scale for p in line["box"]], [p[1] * scale for p in line["box"]]
        inside[max(0, int(min(ys)) - 14):int(max(ys)) + 3, max(0, int(min(xs)) - 3):int(max(xs)) + 3] = True
    assert changed[~inside].sum() == 0, "pixels changed outside every OCR box"


@pytest.mark.slow
def test_a_failed_video_is_explained(build: tuple[Path, list[str]]) -> None:
    root, _ = build
    res = CliRunner().invoke(app, ["inspect", str(root), "broken-not-a-video"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "not_a_video" in res.output and "feature store" in res.output
    res = CliRunner().invoke(app, ["inspect", str(root), "broken-no-audio", "--json"])
    doc = json.loads(res.output)
    assert {(r["stage"], r["error_kind"]) for r in doc["ledger"] if r["status"] == "error"} >= {("mel", "no_audio")}
    assert "mel.npy" not in doc["members"] and "meta.json" in doc["members"]
    assert "no audio" in doc["video"]["first_error"] and "mel:no_audio" in doc["video"]["errors"]
    res = CliRunner().invoke(app, ["inspect", str(root), "no-such-video"])
    assert res.exit_code != 0 and "not in" in res.output


@pytest.mark.slow
def test_html_page_renders_in_chromium(build: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = build
    out = tmp_path / "video.html"
    res = CliRunner().invoke(app, ["inspect", str(root), GOOD, "--html", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    frames = len(gather(str(root), GOOD)["frame_members"])
    result = chromium(out, tmp_path)
    assert_clean_page(result, frames)
    assert result["images"] == frames
    for cls in ("meta", "ledger", "arrays"):
        assert f'class="{cls}"' in result["dom"]


def test_embedding_norms() -> None:
    """Per-field norms for text embeddings (an empty field is a zero row), a summary for many frames."""
    text = np.zeros((3, 8), np.float16)
    text[0, 0], text[2, :2] = 1.0, 0.6
    s = array_summary("text.npy", npy_bytes(text), ["title", "subtitle", "transcript"])
    assert s["row_norms"] == {"title": 1.0, "subtitle": 0.0, "transcript": pytest.approx(0.8485, abs=1e-3)}
    clip = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float16)
    clip /= np.linalg.norm(clip.astype(np.float32), axis=1, keepdims=True)
    s = array_summary("clip.npy", npy_bytes(clip))
    assert s["shape"] == [30, 16] and s["row_norms"]["min"] == pytest.approx(1.0, abs=2e-3)
    assert "row_norms" not in array_summary("mel.npy", npy_bytes(np.ones((80, 5), np.float16)))
