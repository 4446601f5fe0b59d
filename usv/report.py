"""`usv report ROOT`: what a build holds, as numbers a person (and a script) can read.

The statistics mirror the paper's Table 1 and Figure 2, plus what only a pipeline knows:
per-stage timings and the failure breakdown from the ledger. They are computed once here
(`summarize`) and rendered three ways: JSON (`--json`), Markdown (the build's Prefect
artifact, `summary_markdown`) and a self-contained HTML page (`usv.report_html`).
Tables a stage has not written yet (ASR segments, speaker turns …) are simply absent.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from storage.atomic import exists, join, read_bytes, read_json, write_bytes
from storage.ledger import Ledger

TABLES = ("ocr_lines", "asr_segments", "speaker_turns")
DURATION_BUCKETS = (0, 15, 30, 60, 120, 300, float("inf"))


def resolve_root(root: str) -> str:
    return root if "://" in root else str(Path(root).expanduser().resolve())


@dataclass
class Build:
    """Everything `summarize` reads from an output root, loaded once."""

    root: str
    videos: list[dict[str, Any]]
    tables: dict[str, list[dict[str, Any]]]
    ledger: pa.Table
    latest: pa.Table
    index: dict[str, Any] = field(default_factory=dict)


def read_table(root: str, name: str) -> list[dict[str, Any]] | None:
    url = join(root, "tables", f"{name}.parquet")
    if not exists(url):
        return None
    return pq.read_table(io.BytesIO(read_bytes(url))).to_pylist()


def load_build(root: str) -> Build:
    root = resolve_root(root)
    videos = read_table(root, "videos")
    if videos is None:
        raise typer.BadParameter(f"{root} has no tables/videos.parquet: is it the output root of a build?")
    tables = {name: rows for name in TABLES if (rows := read_table(root, name)) is not None}
    ledger = Ledger(root)
    index = read_json(join(root, "shards", "index.json")) if exists(join(root, "shards", "index.json")) else {}
    return Build(root, videos, tables, ledger.table(), ledger.latest(), index)


def _by_video(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["video_id"]].append(r)
    return out


def subtitles(b: Build) -> dict[str, str] | None:
    """Video-level subtitle per video (OCR lines that are not watermarks, in time order)."""
    if "ocr_lines" not in b.tables:
        return None
    lines = _by_video([r for r in b.tables["ocr_lines"] if not r.get("watermark")])
    return {vid: "\n".join(r["text"] for r in sorted(rows, key=lambda r: r["start"])) for vid, rows in lines.items()}


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


def dataset_stats(b: Build) -> dict[str, Any]:
    """The paper's Table 1, over the videos that have a sample in the shards."""
    packed = [v for v in b.videos if v.get("shard")]
    splits = Counter(v["split"] for v in packed)
    topics = Counter(v["topic"] for v in packed)
    macros = Counter(v["macro_topic"] for v in packed if v.get("macro_topic"))
    titles = [len(v["title"].strip()) for v in packed if (v.get("title") or "").strip()]
    subs = subtitles(b)
    sub_lens = [len(subs[v["video_id"]]) for v in packed if subs and subs.get(v["video_id"], "").strip()]
    durations = [float(v["probe_duration"]) for v in packed if v.get("probe_duration")]
    train_topics = Counter(v["topic"] for v in packed if v["split"] == "train")
    return {
        "videos in manifest": len(b.videos),
        "videos in shards": len(packed),
        **{f"{s} set": splits.get(s, 0) for s in sorted(set(splits) | {"train", "val", "test"})},
        "topic (micro-category) labels": len(topics),
        "average videos per topic": _mean(list(topics.values())),
        "macro-category labels": len(macros),
        "average videos per macro-category": _mean(list(macros.values())),
        "range of training videos per topic": (f"{min(train_topics.values())}-{max(train_topics.values())}"
                                               if train_topics else None),
        "videos with valid subtitles": len(sub_lens) if subs is not None else None,
        "videos with valid titles": len(titles),
        "average length of valid subtitles": _mean(sub_lens),
        "average length of valid titles": _mean(titles),
        "videos with valid audio": sum(bool(v.get("probe_has_audio")) for v in packed),
        "average duration (s)": _mean(durations),
        "total duration (h)": round(sum(durations) / 3600, 3),
    }


def _bucket(seconds: float) -> str:
    for lo, hi in itertools.pairwise(DURATION_BUCKETS):
        if seconds < hi:
            return f"{lo}-{hi:g} s" if hi != float("inf") else f"≥{lo} s"
    return "?"


def distributions(b: Build) -> dict[str, Any]:
    """Figure 2 (videos per duration, per category) plus languages, speakers and OCR density."""
    packed = [v for v in b.videos if v.get("shard")]
    durations = [float(v["probe_duration"]) for v in packed if v.get("probe_duration")]
    buckets = Counter(_bucket(d) for d in durations)
    order = [_bucket(lo) for lo in DURATION_BUCKETS[:-1]]
    out: dict[str, Any] = {
        "durations": durations,
        "duration_buckets": {k: buckets.get(k, 0) for k in order},
        "topics": dict(Counter(v["topic"] for v in packed).most_common()),
        "macro_topics": dict(Counter(v["macro_topic"] or "(none)" for v in packed).most_common()),
    }
    asr = _by_video(b.tables.get("asr_segments", []))
    spoken = {vid: rows[0]["language"] for vid, rows in asr.items() if rows and rows[0].get("language")}
    out["languages_source"] = "asr" if spoken else "manifest"
    out["languages"] = dict(Counter(spoken.get(v["video_id"]) or v.get("language") or "(unknown)"
                                    for v in packed).most_common())
    turns = b.tables.get("speaker_turns")
    if turns is None and asr and any("speaker" in r for r in b.tables["asr_segments"]):
        turns = [r for r in b.tables["asr_segments"] if r.get("speaker")]
    if turns is not None:
        speakers = {vid: len({r["speaker"] for r in rows}) for vid, rows in _by_video(turns).items()}
        counts = Counter(speakers.get(v["video_id"], 0) for v in packed if v.get("probe_has_audio"))
        out["speakers_per_video"] = {str(k): counts[k] for k in sorted(counts)}
    subs = subtitles(b)
    if subs is not None:
        lines = _by_video([r for r in b.tables["ocr_lines"] if not r.get("watermark")])
        out["ocr_lines_per_minute"] = [round(60.0 * len(lines.get(v["video_id"], [])) / float(v["probe_duration"]), 2)
                                       for v in packed if v.get("probe_duration")]
        out["ocr_chars_per_second"] = [round(len(subs.get(v["video_id"], "")) / float(v["probe_duration"]), 2)
                                       for v in packed if v.get("probe_duration")]
        out["watermarks"] = dict(Counter(r["text"] for r in b.tables["ocr_lines"] if r.get("watermark"))
                                 .most_common(10))
    return out


def stage_timings(b: Build) -> list[dict[str, Any]]:
    """Seconds per video per stage over every ledger row that did work (status ok or error)."""
    rows: dict[str, dict[str, Any]] = {}
    for stage, status, secs in zip(*(b.ledger[c].to_pylist() for c in ("stage", "status", "seconds")), strict=True):
        r = rows.setdefault(stage, {"stage": stage, "ok": 0, "cached": 0, "error": 0, "_s": []})
        r[status] += 1
        if status != "cached":
            r["_s"].append(float(secs))
    out = []
    for r in rows.values():
        s = np.array(r.pop("_s") or [0.0])
        out.append({**r, "total_s": round(float(s.sum()), 3), "mean_s": round(float(s.mean()), 4),
                    "p50_s": round(float(np.percentile(s, 50)), 4), "p95_s": round(float(np.percentile(s, 95)), 4),
                    "max_s": round(float(s.max()), 4)})
    return sorted(out, key=lambda r: -r["total_s"])


def failures(b: Build, examples: int = 5) -> list[dict[str, Any]]:
    """What is failing now (newest ledger row per video and stage), by stage and error kind."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    cols = ("stage", "status", "error_kind", "video_id", "message")
    for stage, status, kind, vid, msg in zip(*(b.latest[c].to_pylist() for c in cols), strict=True):
        if status == "error":
            groups[(stage, kind)].append((vid, msg))
    return [{"stage": stage, "error": kind, "videos": len(items),
             "examples": sorted(v for v, _ in items)[:examples], "message": items[0][1]}
            for (stage, kind), items in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def random_weight_stages(b: Build) -> list[str]:
    """Packed stages whose recorded provenance says random weights: every report must say so."""
    from usv.doctor import random_flags

    out = []
    for stage, fp in b.index.get("stages", {}).items():
        info = join(b.root, "features", stage, fp, "stage.json")
        if exists(info) and random_flags(read_json(info)):
            out.append(stage)
    return sorted(out)


def summarize(root: str) -> dict[str, Any]:
    """All of a build's report numbers, JSON-serialisable."""
    b = load_build(root)
    return {
        "root": b.root, "stages": b.index.get("stages", {}), "random_weights": random_weight_stages(b),
        "tables": sorted(b.tables), "table1": dataset_stats(b), "distributions": distributions(b),
        "timings": stage_timings(b), "failures": failures(b),
        "runs": sorted(set(b.ledger["run_id"].to_pylist())),
    }


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return "–" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def summary_markdown(s: dict[str, Any]) -> str:
    """The build summary as Markdown: Table 1, distributions in brief, timings, failures."""
    d = s["distributions"]
    parts = ["## Dataset (paper Table 1)",
             _md_table([{"statistic": k, "value": v} for k, v in s["table1"].items()], ["statistic", "value"])]
    if s["random_weights"]:
        parts.insert(0, f"> **Random weights** in stages: {', '.join(s['random_weights'])} — not a real model.")
    parts += ["## Distributions",
              "- duration: " + ", ".join(f"{k}: {v}" for k, v in d["duration_buckets"].items()),
              f"- languages ({d['languages_source']}): " + ", ".join(f"{k}: {v}" for k, v in d["languages"].items())]
    if "speakers_per_video" in d:
        parts.append("- speakers per video: " + ", ".join(f"{k}: {v}" for k, v in d["speakers_per_video"].items()))
    if "ocr_lines_per_minute" in d:
        parts.append(f"- subtitle lines per minute (mean): {_mean(d['ocr_lines_per_minute'])}")
    parts += ["## Stage timings (seconds per video)",
              _md_table(s["timings"], ["stage", "ok", "cached", "error", "total_s", "mean_s", "p95_s"])]
    parts += ["## Failures", _md_table(s["failures"], ["stage", "error", "videos", "examples", "message"])
              if s["failures"] else "none"]
    return "\n\n".join(parts) + "\n"


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        root: Annotated[str, typer.Argument(help="output root of a build")] = "data/out",
        out: Annotated[str | None, typer.Option(help="HTML file to write (default ROOT/report.html)")] = None,
        runs: Annotated[list[Path] | None, typer.Option(help="training run folder(s), or a folder of runs")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the numbers as JSON, write no HTML")] = False,
        markdown: Annotated[bool, typer.Option(help="print the Markdown summary, write no HTML")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the report's path")] = False,
    ) -> None:
        """Write a self-contained HTML report of a build (and of training runs, if given)."""
        from usv.progress import steps

        with steps(3, "report", quiet=quiet or as_json or markdown) as step:
            step("reading tables and ledger")
            s = summarize(root)
            if as_json:
                typer.echo(json.dumps(s, indent=1, default=str))
                return
            if markdown:
                typer.echo(summary_markdown(s))
                return
            from usv.report_html import find_runs, render_report

            step("reading training runs")
            found = find_runs(runs or [])
            step("plotting")
            html = render_report(s, found)
            target = out or join(s["root"], "report.html")
            write_bytes(target, html.encode())
        typer.echo(target if quiet else f"wrote {target} ({len(html) / 1e6:.2f} MB, {len(found)} training run(s))")
