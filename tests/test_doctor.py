"""`usv doctor`: passes on this machine, and fails (exit 1, naming the cause) when ffmpeg is
missing, a stage's weights or settings are wrong, a stage is unknown, or the Prefect API is down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from usv import prefect_env
from usv.cli import app
from usv.doctor import random_flags


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, str]]]:
    res = CliRunner().invoke(app, ["doctor", "--json", *args], env=env)
    doc = json.loads(res.output)
    assert doc["ok"] == (res.exit_code == 0), res.output
    return res.exit_code, {c["name"]: c for c in doc["checks"]}


def test_this_machine_can_run_the_cheap_stages(tmp_path: Path) -> None:
    code, checks = doctor("--stages", "meta,mel,frames", "--output", str(tmp_path / "out"), "--min-free-gb", "0")
    assert code == 0
    for name in ("ffmpeg", "ffprobe", "decoder h264", "decoder aac", "stage meta", "stage mel", "stage frames",
                 "disk"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "GiB free" in checks["disk"]["detail"]


def test_loading_a_model_stage(tmp_path: Path) -> None:
    code, checks = doctor("--stages", "ocr", "--load", "--output", str(tmp_path))
    assert code == 0 and "loaded in" in checks["stage ocr"]["detail"] and "weights" in checks["stage ocr"]["detail"]


def test_missing_weights_name_the_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "build.yaml"
    cfg.write_text("stages: [meta, ocr]\nstage_config:\n  ocr: {backend: easyocr, easyocr_model_dir: /nonexistent}\n")
    code, checks = doctor("--config", str(cfg), "--output", str(tmp_path))
    assert code == 1
    assert checks["stage ocr"]["status"] == "fail" and "easyocr_model_dir" in checks["stage ocr"]["detail"]
    assert checks["stage meta"]["status"] == "ok"


def test_unknown_stage_and_bad_settings(tmp_path: Path) -> None:
    code, checks = doctor("--stages", "meta,nosuch", "--output", str(tmp_path))
    assert code == 1 and "nosuch" in checks["stages"]["detail"]
    cfg = tmp_path / "b.yaml"
    cfg.write_text("stages: [frames]\nstage_config:\n  frames: {short_side: 1, typo: 3}\n")
    code, checks = doctor("--config", str(cfg), "--output", str(tmp_path))
    assert code == 1 and "bad settings" in checks["stage frames"]["detail"]


def test_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ffmpeg, no ffprobe
    code, checks = doctor("--stages", "meta", "--output", str(tmp_path))
    assert code == 1
    assert checks["ffmpeg"]["status"] == "fail" and "apt-get install ffmpeg" in checks["ffmpeg"]["detail"]
    assert checks["decoder h264"]["status"] == "fail"


def test_prefect_api_down_and_low_disk(tmp_path: Path) -> None:
    url = prefect_env.api_url(prefect_env.free_port())  # nothing listens there
    code, checks = doctor("--stages", "meta", "--output", str(tmp_path), "--min-free-gb", "1e9",
                          env={"PREFECT_API_URL": url})
    assert code == 1 and checks["prefect api"]["status"] == "fail"
    assert "usv server up" in checks["prefect api"]["detail"]
    assert checks["disk"]["status"] == "warn"


def test_random_weights_are_flagged() -> None:
    prov = {"stage": "clip", "config": {"random_weights": True, "model": "ViT-B-32"}, "weights": ""}
    assert random_flags(prov) == ["config.random_weights"]
    assert random_flags({"config": {"random_weights": False}}) == []
