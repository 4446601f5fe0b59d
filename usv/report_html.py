"""HTML rendering of `usv report` (and the page helpers `usv inspect` shares).

One file, no scripts, no external requests: plots are matplotlib (Agg) PNGs inlined as
base64 data URIs, styles are inline, so the page can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:100%;border:1px solid #eee}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px;margin:8px 0}.muted{color:#777}
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap}
"""


def esc(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    if isinstance(value, float):
        value = f"{value:.4g}"
    return html.escape(str(value))


def table(columns: Sequence[str], rows: Sequence[dict[str, Any]], cls: str = "") -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"n" if isinstance(r.get(c), int | float) else ""}">{esc(r.get(c))}</td>'
                         for c in columns) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kv_table(items: dict[str, Any], cls: str = "") -> str:
    return table(["statistic", "value"], [{"statistic": k, "value": v} for k, v in items.items()], cls)


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>")


def _figure(width: float = 6.0, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def bar_png(counts: dict[str, int | float], title: str, ylabel: str = "videos") -> bytes:
    labels = list(counts)
    fig, ax = _figure(min(16.0, max(5.0, 0.25 * len(labels) + 2)), 3.4)
    ax.bar(range(len(labels)), list(counts.values()), color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6
                  else "center", fontsize=7 if len(labels) > 30 else 9)
    ax.set(title=title, ylabel=ylabel)
    return _png(fig)


def hist_png(values: Sequence[float], title: str, xlabel: str) -> bytes:
    fig, ax = _figure()
    ax.hist(list(values), bins=min(40, max(5, len(set(values)))), color="#55a868")
    ax.set(title=title, xlabel=xlabel, ylabel="videos")
    return _png(fig)


def find_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Training run folders (holding metrics.json or history.json) at or directly under each path."""
    found: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        candidates = [p] if (p / "metrics.json").exists() or (p / "history.json").exists() else sorted(
            c for c in p.glob("*") if c.is_dir() and ((c / "metrics.json").exists() or (c / "history.json").exists()))
        found += [c for c in candidates if c not in found]
    runs = []
    for path in found:
        def load(name: str, path: Path = path) -> Any:
            f = path / name
            return json.loads(f.read_text()) if f.exists() else {}
        runs.append({"name": path.name, "path": str(path), "metrics": load("metrics.json"),
                     "history": load("history.json"),
                     "plots": {f.stem: f.read_bytes() for f in sorted((path / "plots").glob("*.png"))}})
    return runs


def _run_section(run: dict[str, Any]) -> str:
    m = run["metrics"]
    parts = [f"<h3>{esc(run['name'])} <span class='muted'>({esc(m.get('task', '?'))}, "
             f"eval split {esc(m.get('eval_split'))}, {esc(run['path'])})</span></h3>"]
    if "table5" in m:
        rows = [{"branches": combo, **v} for combo, v in m["table5"].items()]
        parts += ["<h4>Topic recognition: mean class accuracy (paper Table 5)</h4>",
                  table(["branches", "mca", "top1", "n"], rows, "metrics-table")]
        if m.get("confused_pairs"):
            worst = max(m["confused_pairs"], key=lambda c: c.count("+"))
            parts += [f"<h4>Most confused classes ({esc(worst)}, paper Table 8)</h4>",
                      table(["class1", "class2", "confusion"], m["confused_pairs"][worst], "metrics-table")]
    if "table6" in m:
        rows = [{"modalities": name, "direction": d, **v[d],
                 "zero-shot mca": m.get("table7_zero_shot", {}).get(name, {}).get("mca")}
                for name, v in m["table6"].items() for d in ("video_to_title", "title_to_video")]
        parts += ["<h4>Video–title retrieval (paper Tables 6 and 7)</h4>",
                  table(["modalities", "direction", "R@1", "R@5", "R@10", "MedR", "zero-shot mca"], rows,
                        "metrics-table")]
    if m.get("skipped"):
        parts.append(f"<p class='warn'>skipped: {esc(json.dumps(m['skipped']))}</p>")
    plots = dict(run["plots"])
    if "loss" not in plots and run["history"].get("loss"):
        plots["loss"] = _loss_png(run["history"]["loss"])
    if plots:
        parts.append('<div class="plots">' + "".join(img(png, f"{run['name']} {name}") for name, png in plots.items())
                     + "</div>")
    return "".join(parts)


def _loss_png(histories: dict[str, list[float]]) -> bytes:
    fig, ax = _figure()
    for name, hist in histories.items():
        ax.plot(range(1, len(hist) + 1), hist, marker=".", label=name)
    ax.set(xlabel="epoch", ylabel="training loss", title="training curves")
    ax.legend()
    return _png(fig)


def render_report(s: dict[str, Any], runs: Sequence[dict[str, Any]] = ()) -> str:
    """The whole report page from `usv.report.summarize` output and `find_runs` output."""
    d = s["distributions"]
    body = [f"<p>output root <code>{esc(s['root'])}</code>; builds in the ledger: {esc(len(s['runs']))}; "
            f"tables: {esc(s['tables'] or 'videos only')}</p>"]
    if s["random_weights"]:
        body.append(f"<p class='warn'><b>Random weights</b> in stages {esc(s['random_weights'])}: their features "
                    "carry no meaning.</p>")
    body += ["<h2>Stages</h2>", table(["stage", "fingerprint"],
                                       [{"stage": k, "fingerprint": v} for k, v in s["stages"].items()]),
             "<h2>Dataset (paper Table 1)</h2>", kv_table(s["table1"], "table1"),
             "<h2>Distributions (paper Figure 2)</h2>", '<div class="plots">']
    if d["durations"]:
        body.append(img(hist_png(d["durations"], "videos per duration", "duration (s)"), "duration histogram"))
    body.append(img(bar_png(d["duration_buckets"], "videos per duration bucket"), "duration buckets"))
    body.append(img(bar_png(d["topics"], "videos per topic"), "videos per topic"))
    body.append(img(bar_png(d["macro_topics"], "videos per macro topic"), "videos per macro topic"))
    body.append(img(bar_png(d["languages"], f"languages ({d['languages_source']})"), "languages"))
    if "speakers_per_video" in d:
        body.append(img(bar_png(d["speakers_per_video"], "speakers per video (videos with audio)"), "speakers"))
    if d.get("ocr_lines_per_minute"):
        body.append(img(hist_png(d["ocr_lines_per_minute"], "OCR density", "subtitle lines per minute"), "ocr"))
    body.append("</div>")
    if d.get("watermarks"):
        body += ["<h3>Most frequent watermarks (removed from subtitles)</h3>",
                 table(["text", "videos"], [{"text": k, "videos": v} for k, v in d["watermarks"].items()])]
    body += ["<h2>Per-stage timings (seconds per video, all ledger rows)</h2>",
             table(["stage", "ok", "cached", "error", "total_s", "mean_s", "p50_s", "p95_s", "max_s"], s["timings"],
                   "timings")]
    if s["timings"]:
        body.append('<div class="plots">' + img(bar_png({t["stage"]: t["total_s"] for t in s["timings"]},
                                                        "total seconds per stage", "seconds"), "stage seconds")
                    + "</div>")
    body += ["<h2>Failures (current state, by stage and error)</h2>",
             table(["stage", "error", "videos", "examples", "message"], s["failures"], "failures")]
    if runs:
        body += ["<h2>Training</h2>"] + [_run_section(r) for r in runs]
    return page("usv build report", "".join(body))
