"""Smoke test of the throughput race: both contestants run on one 3 s video and the tables come out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is a folder of scripts, not installed

from bench import race


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_race_prints_tables_and_outputs_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = race.main(["--work", str(tmp_path), "--videos", "1", "--seconds", "3", "--stages", "mel,ocr",
                         "--no-bbb"])
    out = capsys.readouterr().out
    assert "speed-up B/A" in out and "Identical outputs" in out
    assert result["videos"] == 1
    assert result["a_wall"] > 0 and result["b_wall"] > 0 and result["a_peak_rss"] > 0
    assert {"ocr", "mel"} <= set(result["a_stages"]) and {"ocr", "mel"} <= set(result["b"]["stages"])
    checks = {c["check"]: c for c in result["checks"]}
    assert checks["mel max abs diff"]["videos"] == 1
    assert checks["mel max abs diff"]["worst"] <= 0.01  # one decode path, the same torchaudio transform
    assert checks["ocr subtitle CER A vs B (max)"]["worst"] <= 0.1


def test_memory_table_verdict() -> None:
    from bench.memory import format_memory

    rows = [{"videos": 100, "wall_s": 1.0, "videos_per_hour": 1, "peak_rss_mib": 500.0},
            {"videos": 1000, "wall_s": 9.0, "videos_per_hour": 1, "peak_rss_mib": 640.0}]
    assert "+28.0%" in format_memory(rows) and "MISSED" in format_memory(rows)
    rows[1]["peak_rss_mib"] = 550.0
    assert "met" in format_memory(rows)
