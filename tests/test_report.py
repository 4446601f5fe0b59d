"""`usv report` on a real build of a tiny synthetic corpus (with broken inputs), rendered in
headless Chromium: the page must show its tables and decodable plots and log no errors.

The build (real `usv build` CLI, cheap stages plus whichever model stages pass `usv doctor`)
is made once per session and shared with tests/test_inspect.py through `built_root`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from usv.cli import app
from usv.config import BuildConfig
from usv.doctor import check_stages
from usv.report import summarize, summary_markdown
from usv.synth import COLUMNS, add_broken_inputs, make_corpus

BIN = Path(sys.executable).parent
CHEAP = ["meta", "mel", "frames"]
MODEL_STAGES = ("ocr", "diarize", "asr")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0"]
# Injected into a copy of the page: records script errors and failed resource loads (capture
# phase), then on load whether every image decoded, as attributes --dump-dom can show.
PROBE = """<script>window.__errs=[];addEventListener('error',e=>{__errs.push(e.message||
(e.target&&(e.target.src||'').slice(0,40))||'error')},true);addEventListener('load',()=>{const im=[...document.images];
document.documentElement.setAttribute('data-images',im.length);document.documentElement.setAttribute('data-broken',
im.filter(i=>!(i.complete&&i.naturalWidth>0)).length);document.documentElement.setAttribute('data-errors',
JSON.stringify(__errs))});</script>"""


def built_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Output root of one `usv build` per session (a marker file makes it shareable across modules)."""
    base = tmp_path_factory.getbasetemp() / "usv-report-build"
    stages = CHEAP + [c.name.split()[1] for c in check_stages(BuildConfig(stages=[
        s for s in MODEL_STAGES if _registered(s)]), load=False) if c.status == "ok"]
    if not (base / "done").exists():
        manifest = make_corpus(base / "corpus", topics=3, per_topic=2, seconds=3.0, seed=3)
        broken = add_broken_inputs(base / "corpus")
        with open(manifest, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=list(COLUMNS)).writerows(broken)
        (base / "build.yaml").write_text(yaml.safe_dump({
            "stages": stages, "batch_size": 16, "pack": {"split_ratios": {"train": 0.5, "test": 0.5}, "seed": 1}}))
        env = {**os.environ, "PREFECT_HOME": str(base / "prefect")}
        proc = subprocess.run([str(BIN / "usv"), "build", str(manifest), "--output", str(base / "out"), "--config",
                               str(base / "build.yaml")], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (base / "done").write_text("ok")
    return base / "out", stages


def _registered(name: str) -> bool:
    from extractors.base import registry

    return name in registry()


def chromium(page: Path, tmp: Path) -> dict[str, Any]:
    """Load the page in headless Chromium: screenshot, console lines, image and error counts."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is needed: apt-get install -y chromium"
    probe = tmp / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    shot = tmp / f"{page.stem}.png"
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    snap = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and snap.returncode == 0, dom.stderr[-2000:] + snap.stderr[-2000:]
    console = [ln for ln in (dom.stderr + snap.stderr).splitlines() if ":CONSOLE" in ln]
    root_tag = re.search(r"<html[^>]*>", dom.stdout)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', root_tag.group(0) if root_tag else ""))
    return {"dom": dom.stdout, "console": console, "images": int(attrs.get("images", -1)),
            "broken": int(attrs.get("broken", -1)), "errors": attrs.get("errors", "?"), "screenshot": shot}


def assert_clean_page(result: dict[str, Any], min_images: int) -> None:
    assert result["console"] == [], result["console"]
    assert result["errors"] == "[]", result["errors"]
    assert result["images"] >= min_images, result["images"]
    assert result["broken"] == 0, f"{result['broken']} image(s) did not decode"
    shot = np.asarray(Image.open(result["screenshot"]).convert("L"), dtype=np.float32)
    assert shot.shape == (2000, 1280) and shot.std() > 10, "screenshot is blank"


def test_chromium_check_catches_a_broken_page(tmp_path: Path) -> None:
    """The page check itself can fail: a console error, a script error and an undecodable image."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom"); notDefined();</script></body></html>')
    result = chromium(bad, tmp_path)
    assert any("boom" in ln for ln in result["console"]) and "notDefined" in result["errors"]
    assert result["broken"] == 1
    with pytest.raises(AssertionError):
        assert_clean_page(result, 1)


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    return built_root(tmp_path_factory)


@pytest.mark.slow
def test_summary_numbers_match_the_corpus(build: tuple[Path, list[str]]) -> None:
    root, stages = build
    s = summarize(str(root))
    t1 = s["table1"]
    assert t1["videos in manifest"] == 9 and t1["videos in shards"] == 7  # 6 good + the silent clip
    assert t1["train set"] + t1["test set"] == 7
    assert t1["topic (micro-category) labels"] == 3 and t1["videos with valid titles"] == 7
    assert t1["videos with valid audio"] == 6
    assert t1["average duration (s)"] == pytest.approx((6 * 3.0 + 3.0) / 7, abs=0.1)
    fails = {(f["stage"], f["error"]): f for f in s["failures"]}
    assert fails[("ingest", "not_a_video")]["examples"] == ["broken-not-a-video"]
    assert fails[("ingest", "fetch")]["examples"] == ["broken-missing"]
    assert ("mel", "no_audio") in fails and fails[("mel", "no_audio")]["examples"] == ["broken-no-audio"]
    assert {t["stage"] for t in s["timings"]} >= {"ingest", *stages}
    if "ocr" in stages:
        assert s["table1"]["videos with valid subtitles"] is not None and "ocr_lines" in s["tables"]
    if "diarize" in stages:
        assert sum(s["distributions"]["speakers_per_video"].values()) == 6
    md = summary_markdown(s)
    assert "| videos in shards | 7 |" in md and "broken-not-a-video" in md


def _train_run(root: Path, runs: Path) -> Path:
    """A tiny real MMF-Net run (audio branch only) on the build's shards, for the training section."""
    from training.config import TopicConfig
    from training.topic import train_topic

    cfg = TopicConfig.model_validate({
        "data": {"shards": str(root), "batch_size": 4}, "run": {"output": str(runs), "name": "tiny", "seed": 0},
        "branches": ["audio"], "audio": {"width": 4, "blocks": [1, 1], "test_clips": 2,
                                         "optim": {"epochs": 2, "lr": 3e-3}}})
    train_topic(cfg)
    return runs / "tiny"


@pytest.mark.slow
def test_html_report_renders_in_chromium(build: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, stages = build
    run = _train_run(root, tmp_path / "runs")
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(root), "--out", str(out), "--runs", str(run.parent), "--quiet"])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html, "the report must be self-contained"
    result = chromium(out, tmp_path)
    plots = 5 + ("diarize" in stages) + ("ocr" in stages) + 1  # distributions + timing bar chart
    assert_clean_page(result, plots + 1)  # + the run's loss curve
    dom = result["dom"]
    for cls in ("table1", "timings", "failures", "metrics-table"):
        assert f'class="{cls}"' in dom, cls
    assert "broken-not-a-video" in dom and "not_a_video" in dom and "audio" in dom
    shutil.copy(result["screenshot"], root.parent / "report-screenshot.png")  # kept for a person to look at


@pytest.mark.slow
def test_random_weights_are_flagged_in_every_rendering(build: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A stage whose recorded provenance says random weights is named in the Markdown and the page."""
    root, _ = build
    copy = tmp_path / "out"
    shutil.copytree(root, copy)
    assert summarize(str(copy))["random_weights"] == []
    index = json.loads((copy / "shards" / "index.json").read_text())
    info = copy / "features" / "mel" / index["stages"]["mel"] / "stage.json"
    prov = json.loads(info.read_text())
    info.write_text(json.dumps({**prov, "config": {**prov["config"], "random_weights": True}}))
    s = summarize(str(copy))
    assert s["random_weights"] == ["mel"]
    assert "Random weights" in summary_markdown(s)
    from usv.report_html import render_report

    assert "Random weights</b> in stages mel" in render_report(s)
